"""ingest's formats: which format a source's rows are in, and one row -> (messages, extra record keys, meta).

Formats: table (a column mapping), alpaca, sharegpt (with tools and function_call/observation
turns; in a row with tools, an assistant turn in ReAct style, "Action: name" / "Action Input: {json}",
is a tool call too), messages (OpenAI), xtuner (conversation of system/input/output), preference
(chosen/rejected), exam (docx question/answer blocks), mcq (stages/mcq.py) and text (continued
pretraining). The rows come from stages/ingest_readers.py.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import orjson

from stages import mcq, tool_calls
from stages.common import StageError
from stages.ingest_readers import RowProblem, as_text, check_size

if TYPE_CHECKING:
    from stages.ingest import Source


# ----------------------------------------------------------------------------------------------
# Formats: detection, then one row -> (messages, extra keys of the record, meta)
# ----------------------------------------------------------------------------------------------
QUESTION_NAMES = ["question", "questions", "ask", "query", "prompt", "问题", "提问", "问"]
ANSWER_NAMES = ["answer", "answers", "response", "reply", "completion", "回答", "答案", "答"]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "tool", "tool": "tool", "function": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}


def detect_table(src: Source, header: list[str]) -> tuple[str, dict]:
    """The mapping of a table: named in params, or the one obvious question and answer column."""
    lower = {h.casefold(): h for h in header if h}
    if src.format in ("auto", "mcq"):
        choice = mcq.detect_mapping(header, src.question, src.answer, src.options)
        if choice is not None and (src.format == "mcq" or src.options or mcq.option_columns(header)):
            return "mcq", choice
        if src.format == "mcq":
            raise StageError(f"{src.path}: cannot find the question, option (A, B, ...) and answer columns of a "
                             f"multiple-choice table (columns: {', '.join(header)}); set question:, options: "
                             "and answer: for this source in params.yaml ingest.sources")
    if src.question is not None or src.answer is not None:
        if src.question is None or src.answer is None:
            raise StageError(f"{src.path}: set both question and answer columns in ingest.sources (or neither)")
        return "table", {"question": src.question, "answer": src.answer}
    if src.format in ("auto", "alpaca") and "instruction" in lower and "output" in lower:
        return "alpaca", {k: lower[k] for k in ("instruction", "input", "output", "system") if k in lower}
    questions = [lower[n] for n in QUESTION_NAMES if n in lower]
    answers = [lower[n] for n in ANSWER_NAMES if n in lower]
    if len(questions) == 1 and len(answers) == 1:
        return "table", {"question": questions[0], "answer": answers[0]}
    raise StageError(f"{src.path}: cannot tell which columns hold the question and the answer "
                     f"(columns: {', '.join(header)}; candidates: question {questions or 'none'}, answer "
                     f"{answers or 'none'}); set question: and answer: for this source in params.yaml ingest.sources")


def detect_json(src: Source, row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise StageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    k = lambda name: src.fields.get(name, name)  # noqa: E731
    keys = set(row)
    if k("chosen") in keys and k("rejected") in keys:
        return "preference"
    if k("conversations") in keys:
        return "sharegpt"
    if k("messages") in keys:
        return "messages"
    if k("conversation") in keys:
        return "xtuner"
    if k("instruction") in keys and k("output") in keys:
        return "alpaca"
    if k("text") in keys and len(keys - {k("text"), "id", "meta", "source"}) == 0:
        return "text"
    if mcq_mapping(src, row) is not None:
        return "mcq"
    lower = {key.casefold() for key in keys}
    if any(n in lower for n in QUESTION_NAMES) and any(n in lower for n in ANSWER_NAMES):
        return "table"
    raise StageError(f"{where}: cannot detect the format from keys {sorted(keys)} (expected conversations, "
                     "messages, conversation, instruction/output, chosen/rejected or question/answer); "
                     "set format: (and fields: to rename keys) for this source in params.yaml ingest.sources")


def mcq_mapping(src: Source, row: dict) -> dict | None:
    """A JSON object's multiple-choice keys (question, options or A/B/..., answer), renamed by fields:."""
    given = {name: src.fields.get(name) for name in ("question", "options", "answer")}
    return mcq.detect_mapping(list(row), given["question"] or src.question, given["answer"] or src.answer,
                              src.options or given["options"])


def text_field(row: dict, key: str, column: str, limit: int, required: bool = True) -> str:
    if key not in row:
        if required:
            raise RowProblem(column, f"missing (keys present: {', '.join(sorted(map(str, row)))})")
        return ""
    value = row[key]
    if isinstance(value, (dict, list)):
        raise RowProblem(column, f"expected text, got a JSON {type(value).__name__}")
    return check_size(as_text(value), column, limit)


def tool_call(value: str, column: str) -> list[dict]:
    """A function_call turn's JSON ({"name", "arguments"}, or a list of them) as OpenAI tool_calls."""
    try:
        call = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise RowProblem(column, f"a function_call turn must be JSON {{name, arguments}} ({e.msg})") from None
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise RowProblem(column, "a function_call turn must be JSON {name, arguments}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments") if isinstance(
        c.get("arguments"), str) else orjson.dumps(c.get("arguments", {})).decode()}} for c in calls]


def parse_tools(row: dict, key: str) -> list | None:
    if key not in row or row[key] in (None, "", []):
        return None
    tools = row[key]
    if isinstance(tools, str):
        try:
            tools = orjson.loads(tools)
        except orjson.JSONDecodeError as e:
            raise RowProblem(key, f"not valid JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem(key, "expected a list of tool (function) definitions")
    return tools


def react_calls(messages: list[dict]) -> list[dict]:
    """A row with tools: its ReAct assistant turns ("Action: name\\nAction Input: {json}") get the
    call in "tool_calls" as function_call turns do (the text stays in "content")."""
    for m in messages:
        if m["role"] == "assistant" and "tool_calls" not in m and tool_calls.REACT.search(m["content"]):
            call = tool_calls.parse_call(m["content"])
            arguments = call["arguments"]
            arguments = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            m["tool_calls"] = [{"type": "function", "function": {"name": call["name"], "arguments": arguments}}]
    return messages


def turns(row: dict, key: str, sharegpt_keys: tuple[str, str], limit: int) -> list[dict]:
    """ShareGPT turns ({from, value}, named sharegpt_keys) or OpenAI messages ({role, content}) as
    canonical messages. Column names for errors are only built when there is one (this runs for
    every turn of 1M rows)."""
    items = row.get(key)
    if not isinstance(items, list):
        raise RowProblem(key, f"expected a list of turns, got {type(items).__name__ if key in row else 'nothing'}")
    from_key, value_key = sharegpt_keys
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RowProblem(f"{key}[{i}]", f"expected an object, got {type(turn).__name__}")
        if from_key in turn or value_key in turn:
            role_key, content_key, roles = from_key, value_key, SHAREGPT_ROLES
        else:
            role_key, content_key, roles = "role", "content", OPENAI_ROLES
        name = turn.get(role_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise RowProblem(f"{key}[{i}].{role_key}", f"unknown role {name!r} "
                                                       f"(expected one of {', '.join(sorted(roles))})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content is not None and not isinstance(content, (str, int, float)):
                raise RowProblem(f"{key}[{i}].{content_key}", f"expected text, got a JSON {type(content).__name__}")
            content = as_text(content)
        if len(content) > limit:
            check_size(content, f"{key}[{i}].{content_key}", limit)
        message = {"role": role, "content": content}
        if role == "function_call":
            message = {"role": "assistant", "content": content,
                       "tool_calls": tool_call(content, f"{key}[{i}].{content_key}")}
        elif role == "assistant" and isinstance(turn.get("tool_calls"), list):
            message["tool_calls"] = turn["tool_calls"]
            if not content:
                message["content"] = orjson.dumps([c.get("function", c) for c in turn["tool_calls"]]).decode()
        messages.append(message)
    return messages


Converted = tuple[list[dict], dict, dict]  # a row's messages, extra record keys and meta
MetaOf = Callable[[dict, set], dict]  # a row's meta, given the keys its format used


def converter(fmt: str, src: Source, mapping: dict, limit: int) -> Callable[[dict], Converted]:
    """The function mapping one row of a source to (messages, extra record keys, meta). Key and
    column names are resolved here, once a source, for the function that runs on every row."""
    meta_of = meta_reader(fmt, src, limit)
    if fmt not in CONVERTERS:  # pragma: no cover - Literal in Source
        raise AssertionError(fmt)
    return CONVERTERS[fmt](src, mapping, limit, meta_of)


def renamer(src: Source) -> Callable[[str], str]:
    """A key's name in the source's rows: as renamed in fields:, else the name itself."""
    return lambda name: src.fields.get(name, name)


def source_system(src: Source) -> list[dict]:
    """The source's system prompt, as a new message for every row (records share no objects)."""
    return [{"role": "system", "content": src.system}] if src.system else []


def row_system(src: Source, row: dict, key: str, limit: int) -> list[dict]:
    """The row's own system prompt where it has one, else the source's."""
    if row.get(key):
        return [{"role": "system", "content": text_field(row, key, key, limit)}]
    return source_system(src)


def meta_reader(fmt: str, src: Source, limit: int) -> MetaOf:
    """A row's meta: the columns named in the source's meta:, else every key its format did not use."""
    if src.meta is not None:
        def meta_of(row: dict, used: set) -> dict:
            return {key: (text_field(row, column, column, limit) if fmt == "table" else row[column] if column in row
                          else text_field(row, column, column, limit)) for key, column in src.meta.items()}
    elif fmt == "table":
        def meta_of(row: dict, used: set) -> dict:
            return {key: as_text(value) for key, value in row.items() if key not in used and key}
    else:
        def meta_of(row: dict, used: set) -> dict:
            return {key: value for key, value in row.items() if key not in used and key}
    return meta_of


def table_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    qcols = mapping["question"] if isinstance(mapping["question"], list) else [mapping["question"]]
    answer, system_column = mapping["answer"], src.system_column
    used = {*qcols, answer, system_column}

    def convert(row: dict) -> Converted:
        question = "\n".join(t for t in (text_field(row, c, c, limit) for c in qcols) if t.strip())
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": text_field(row, answer, answer, limit)}]
        if system_column:
            system = [{"role": "system", "content": text_field(row, system_column, system_column, limit)}]
        else:
            system = source_system(src)
        return system + messages, {}, meta_of(row, used)
    return convert


def alpaca_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    k = renamer(src)
    instruction, input_, output, history_key, system_key = (  # detected table headers, else renamed keys
        mapping.get(name) or k(name) for name in ("instruction", "input", "output", "history", "system"))
    used = {instruction, input_, output, history_key, system_key}

    def convert(row: dict) -> Converted:
        prompt = "\n\n".join(t for t in (text_field(row, instruction, instruction, limit),
                                         text_field(row, input_, input_, limit, required=False)) if t.strip())
        history = []
        for i, pair in enumerate(row.get(history_key) or []):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowProblem(f"{history_key}[{i}]", "expected a [question, answer] pair")
            history += [{"role": "user", "content": as_text(pair[0])},
                        {"role": "assistant", "content": as_text(pair[1])}]
        system = row_system(src, row, system_key, limit)
        messages = history + [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": text_field(row, output, output, limit)}]
        return system + messages, {}, meta_of(row, used)
    return convert


def turns_converter(turns_key: str, src: Source, mapping: dict, limit: int,
                    meta_of: MetaOf) -> Callable[[dict], Converted]:
    """sharegpt (turns_key "conversations") and messages (turns_key "messages")."""
    k = renamer(src)
    key = k(turns_key)
    sharegpt_keys, system_key, tools_key = (k("from"), k("value")), k("system"), k("tools")
    used = {key, system_key, tools_key}

    def convert(row: dict) -> Converted:
        messages = turns(row, key, sharegpt_keys, limit)
        system = row_system(src, row, system_key, limit)
        tools = parse_tools(row, tools_key)
        if tools is None:
            return system + messages, {}, meta_of(row, used)
        return system + react_calls(messages), {"tools": tools}, meta_of(row, used)
    return convert


def xtuner_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    conversation = renamer(src)("conversation")
    used = {conversation}

    def convert(row: dict) -> Converted:
        items = row.get(conversation)
        if not isinstance(items, list):
            raise RowProblem(conversation, "expected a list of {system, input, output} items")
        messages = []
        for i, item in enumerate(items):
            column = f"{conversation}[{i}]"
            if not isinstance(item, dict):
                raise RowProblem(column, f"expected an object, got {type(item).__name__}")
            if item.get("system"):
                system = text_field(item, "system", f"{column}.system", limit)
                messages.append({"role": "system", "content": system})
            messages += [{"role": "user", "content": text_field(item, "input", f"{column}.input", limit)},
                         {"role": "assistant", "content": text_field(item, "output", f"{column}.output", limit)}]
        return source_system(src) + messages, {}, meta_of(row, used)
    return convert


def preference_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    k = renamer(src)
    sharegpt_keys, system_key, tools_key = (k("from"), k("value")), k("system"), k("tools")
    chosen_key, rejected_key = k("chosen"), k("rejected")
    turns_keys, prompt_keys = (k("conversations"), k("messages")), (k("prompt"), k("question"), k("instruction"))

    def convert(row: dict) -> Converted:
        key = next((n for n in turns_keys if n in row), None)
        if key is not None:
            messages = turns(row, key, sharegpt_keys, limit)
        else:
            key = next((n for n in prompt_keys if n in row), prompt_keys[0])
            messages = [{"role": "user", "content": text_field(row, key, key, limit)}]
        system = row_system(src, row, system_key, limit)
        extra: dict = {}
        if (tools := parse_tools(row, tools_key)) is not None:
            extra["tools"] = tools
        chosen, rejected = (preference_answer(row, name, limit) for name in (chosen_key, rejected_key))
        messages = messages + [{"role": "assistant", "content": chosen}]
        extra["rejected"] = {"role": "assistant", "content": rejected}
        if "tools" in extra:
            react_calls([*messages, extra["rejected"]])
        return system + messages, extra, meta_of(row, {key, system_key, tools_key, chosen_key, rejected_key})
    return convert


def preference_answer(row: dict, key: str, limit: int) -> str:
    """chosen / rejected: text, a message, or a list of messages ending in the assistant's."""
    if key not in row:
        raise RowProblem(key, f"missing (keys present: {', '.join(sorted(map(str, row)))})")
    value = row[key]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if isinstance(value, (dict, list)):
        raise RowProblem(key, "expected text or an assistant message")
    return check_size(as_text(value), key, limit)

def exam_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    def convert(row: dict) -> Converted:
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        return source_system(src) + messages, {}, {"section": row["section"]} if row["section"] else {}
    return convert


def mcq_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    question, options, answer = mapping["question"], mapping["options"], mapping["answer"]
    used = {question, answer, *(options if isinstance(options, list) else [options])}

    def convert(row: dict) -> Converted:
        if isinstance(options, list):
            texts = [text_field(row, c, c, limit, required=False) for c in options]
        else:
            texts = [check_size(t, options, limit) for t in mcq.options_of(row.get(options), options)]
        try:
            messages, extra = mcq.record_parts(text_field(row, question, question, limit), texts,
                                               text_field(row, answer, answer, limit), answer)
        except mcq.McqProblem as e:
            raise RowProblem(e.column, e.message) from None
        return source_system(src) + messages, extra, meta_of(row, used)
    return convert


def text_converter(src: Source, mapping: dict, limit: int, meta_of: MetaOf) -> Callable[[dict], Converted]:
    text_key = renamer(src)("text")

    def convert(row: dict) -> Converted:
        text = text_field(row, text_key, text_key, limit)
        return [], {"text": text}, {key: row[key] for key in row if key != text_key} if src.meta is None else {}
    return convert


CONVERTERS = {  # format -> (src, mapping, limit, meta_of) -> the function converting each row
    "table": table_converter, "alpaca": alpaca_converter,
    "sharegpt": functools.partial(turns_converter, "conversations"),
    "messages": functools.partial(turns_converter, "messages"), "xtuner": xtuner_converter,
    "preference": preference_converter, "exam": exam_converter, "mcq": mcq_converter, "text": text_converter}
