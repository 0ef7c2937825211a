"""The tool-call check: does a model call the right tool, with valid JSON arguments equal to the reference?

Held-out tool-calling conversations are test-split records whose assistant calls a tool, in either
style ingest reads (stages/ingest_formats.py): a ShareGPT function_call turn (an assistant message with
"tool_calls", its content the JSON {"name", "arguments"} the model is trained to write), or a ReAct
turn "Action: name\\nAction Input: {json}". The model is given the turns before the first call and
its reply is parsed in either style (also an OpenAI {"function": {...}} object, a list of calls, a
Qwen2.5 <tool_call> block or Llama-3.1's {"name", "parameters"}: the formats of stages/chat_template.py).

Per sample: tool_name (the name equals the reference's), args_valid_json (the arguments are a JSON
object), args_exact (and equal the reference's, compared as parsed JSON), accuracy (all of them).
Scores are percentages, as OpenCompass reports its own. Standard library only: OpenCompass runs
the scorer in its own environment (stages/oc_plugins.py).
"""
from __future__ import annotations

import json
import re

REACT = re.compile(r"Action\s*:\s*(?P<name>[^\n]*?)\s*\n\s*Action\s+Input\s*:\s*(?P<args>.*)", re.DOTALL | re.IGNORECASE)
METRICS = ("accuracy", "tool_name", "args_valid_json", "args_exact")


def first_json(text: str):
    """The first JSON value in text that starts at a "{" or "[", or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue
    return None


def parse_call(text: str) -> dict | None:
    """A reply's first tool call as {"name": str, "arguments": what it gave (dict, or text)}; None if
    it calls no tool."""
    text = text or ""
    react = REACT.search(text)
    if react:
        args_text = react["args"].strip()
        args = first_json(args_text)
        return {"name": react["name"].strip(), "arguments": args if isinstance(args, dict) else args_text}
    call = first_json(text)
    if isinstance(call, list):
        call = next((c for c in call if isinstance(c, dict)), None)
    if isinstance(call, dict) and isinstance(call.get("function"), dict):  # OpenAI tool_calls item
        call = call["function"]
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    # Llama-3.1 writes {"name", "parameters"}
    return {"name": call["name"].strip(), "arguments": call.get("arguments", call.get("parameters", {}))}


def arguments_object(arguments) -> dict | None:
    """Arguments as a JSON object: a dict as is, text that parses to one; else None (invalid)."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None


def reference_call(record: dict) -> tuple[int, dict] | None:
    """(index of the first assistant message that calls a tool, {"name", "arguments": dict}), or None
    when the record calls no tool."""
    for i, message in enumerate(record.get("messages") or []):
        if message.get("role") != "assistant":
            continue
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            function = calls[0].get("function", calls[0]) if isinstance(calls[0], dict) else {}
            call = {"name": function.get("name"), "arguments": function.get("arguments", {})}
        else:
            call = parse_call(message.get("content", "")) if REACT.search(message.get("content") or "") else None
        if call and isinstance(call.get("name"), str):
            args = arguments_object(call["arguments"])
            return i, {"name": call["name"], "arguments": args if args is not None else call["arguments"]}
    return None


def score_one(prediction: str, reference: dict) -> dict:
    """The four checks of one reply against a reference call {"name", "arguments"}."""
    call = parse_call(prediction)
    name_ok = call is not None and call["name"] == reference["name"]
    args = arguments_object(call["arguments"]) if call is not None else None
    exact = name_ok and args is not None and args == arguments_object(reference["arguments"])
    return {"tool_name": name_ok, "args_valid_json": args is not None, "args_exact": bool(exact),
            "accuracy": bool(exact), "called": call}


def score(predictions: list[str], references: list) -> dict:
    """Percentages of the checks over all samples; references as dicts or their JSON text."""
    if not predictions:
        return {m: 0.0 for m in METRICS}
    refs = [json.loads(r) if isinstance(r, str) else r for r in references]
    results = [score_one(p, r) for p, r in zip(predictions, refs)]
    return {m: round(100.0 * sum(r[m] for r in results) / len(results), 4) for m in METRICS}
