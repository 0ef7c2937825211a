"""The chat format, in one place: every stage renders with the base model's own chat template.

The template is the one in the base tokenizer (tokenizer_config.json / chat_template.jinja). The
training ids, the merged tokenizer, lmdeploy (its HFChatTemplate renders with the tokenizer's
template) and OpenCompass (HuggingFacewithChatTemplate) all go through `apply_chat_template`
with it, so they render the same tokens. This module learns from the template itself, never
from one family's strings:
- which tokens a model is trained on: each assistant turn's content and the end-of-turn token
  that follows it (`tokenize_conversation`);
- which token ends an assistant turn, i.e. where generation stops (`stop_token_ids`);
- whether it renders tools (`renders_tools`): conversations with tools (schemas, calls, results)
  are given to it as `apply_chat_template(messages, tools=...)` takes them (`render_chat`), the
  calls trained, the results not; OpenCompass, which passes no tools, gets them folded into the
  system message exactly as the template writes them (`system_with_tools`).
It also holds templates written from the families' published formats, for a base model without
one (`base.chat_template`, e.g. Bloomz) and for the demo model (ChatML). Stdlib only: stages in
every environment import it.
"""
from __future__ import annotations

import json

from stages import tool_calls

IGNORE = -100

# Written from each family's published chat format. `chatml` is the demo model's (and Qwen2.5's /
# InternLM2's); the others serve tests and template-less base models named in params.
TEMPLATES = {
    # ChatML with tools the Qwen2.5 way (no default system text): the schemas in the system turn, a
    # call as <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response> in a user turn.
    # Without tools and tool turns it renders exactly the plain ChatML of earlier versions.
    "chatml": (
        "{% if tools %}{{ '<|im_start|>system\\n' }}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
        "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
        " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
        "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
        "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
        " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, '"
        " + '\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if tools and loop.first and message['role'] == 'system' %}"
        "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
        "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
        "{% for call in message['tool_calls'] %}{% set call = call['function'] if call['function'] is defined else call %}"
        "{{ '\\n<tool_call>\\n{\\\"name\\\": \\\"' + call['name'] + '\\\", \\\"arguments\\\": ' + call['arguments'] | tojson"
        " + '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
        "{% elif message['role'] == 'tool' %}"
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
        "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Llama-3; with tools as Llama-3.1's template renders them with tools_in_user_message=false: the
    # schemas in the system turn, a call as {"name", "parameters"}, results in an ipython turn (one
    # difference: no blank line after the last schema when there is no system text, so the system
    # turn survives the trim of a renderer that takes it as a plain system message, OpenCompass).
    "llama3": (
        "{{ bos_token }}{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n'"
        " + 'You have access to the following functions. To call a function, please respond with JSON for a '"
        " + 'function call.Respond in the format {\"name\": function name, \"parameters\": dictionary of '"
        " + 'argument name and its value}.Do not use variables.\n\n' }}"
        "{% for tool in tools %}{% if not loop.first %}{{ '\n\n' }}{% endif %}{{ tool | tojson(indent=4) }}{% endfor %}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ '\n\n' + messages[0]['content'] | trim }}{% endif %}"
        "{{ '<|eot_id|>' }}{% endif %}"
        "{% for message in messages %}"
        "{% if tools and loop.first and message['role'] == 'system' %}"
        "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
        "{% set call = message['tool_calls'][0] %}{% set call = call['function'] if call['function'] is defined else call %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"' + call['name'] + '\", \"parameters\": '"
        " + call['arguments'] | tojson + '}<|eot_id|>' }}"
        "{% else %}{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
        "{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # GLM-4 ends an assistant turn with nothing: the next role token (or <|user|> at generation)
    # is what follows it, so that is the end-of-turn token trained and stopped on.
    "glm4": (
        "[gMASK]<sop>{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ '' }}{% endif %}"),
    # Gemma has no system turn: a system message is put before the first user message's text.
    "gemma": (
        "{{ bos_token }}{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
        "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + system.text + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% set system.text = '' %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    # Mistral (v0.3 style): the system text goes before the last user message.
    "mistral": (
        "{% set system = namespace(text='') %}{% set last_user = namespace(i=-1) %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% set system.text = message['content'] %}"
        "{% elif message['role'] == 'user' %}{% set last_user.i = loop.index0 %}{% endif %}{% endfor %}"
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == last_user.i and system.text %}{{ '[INST] ' + system.text + '\n\n' + message['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"),
    # A plain format for base models published without a chat template (Bloomz, as the
    # LLaMA-Factory medical tutorials train it): the tokenizer's eos ends an answer.
    "human_assistant": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"),
}


class TemplateError(ValueError):
    """The chat template cannot be used for training as the pipeline needs (a one-line reason)."""


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def _render(tokenizer, messages: list[dict], tools: list | None = None, **kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: name one in "
                            f"params (base.chat_template: one of {sorted(TEMPLATES)} or a .jinja file)")
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Tools: canonical records keep the functions offered in "tools" and each call both as JSON text in
# the assistant's "content" and structured in "tool_calls" (stages/records.py). Templates with tool
# support (Qwen2.5's and Llama-3.1's, `chatml` and `llama3` here) render the schemas, the calls and
# the results themselves: they get OpenAI-style tools, calls with arguments as objects and the
# content left empty when it is only the call's own text. A template that cannot render them
# (glm4, gemma, mistral, human_assistant here) is refused in one line rather than dropping them.
# ----------------------------------------------------------------------------------------------
PROBE_NAMES = ("probe_tool_schema", "probe_tool_call", "probe tool result")


def uses_tools(messages: list[dict], tools: list | None = None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def template_tools(tools: list | None) -> list | None:
    """Tool definitions OpenAI style ({"type": "function", "function": {...}}), as templates take them."""
    if not tools:
        return None
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _call_object(call: dict) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
            arguments = parsed if isinstance(parsed, dict) else arguments
        except ValueError:
            pass
    return {"type": "function", "function": {"name": function.get("name"), "arguments": arguments}}


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as templates with tool support take them: calls with their arguments as objects, an
    assistant's content without the text of its own first call (JSON, or ReAct's Action lines): the
    template writes the call in its own format."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [_call_object(c) for c in m["tool_calls"]]
            content = m.get("content") or ""
            react = tool_calls.REACT.search(content)
            said = tool_calls.parse_call(content)
            if said and said["name"] == calls[0]["function"]["name"]:
                content = content[:react.start()].strip() if react else ""  # a ReAct "Thought:" stays
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


_TOOL_SUPPORT: dict[str, bool] = {}


def renders_tools(tokenizer) -> bool:
    """Whether the chat template writes tool schemas, calls and results (probed once per template)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _TOOL_SUPPORT:
        schema, call, result = PROBE_NAMES
        probe = [{"role": "user", "content": "probe question"},
                 {"role": "assistant", "content": "", "tool_calls": [_call_object({"name": call, "arguments": {}})]},
                 {"role": "tool", "content": result}]
        try:
            text = _render(tokenizer, probe, tools=template_tools([{"name": schema, "parameters": {}}]))
            _TOOL_SUPPORT[template] = all(name in text for name in PROBE_NAMES)
        except Exception:  # noqa: BLE001 - a template that raises on tool turns cannot render them
            _TOOL_SUPPORT[template] = False
    return _TOOL_SUPPORT[template]


def chat_inputs(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[list[dict], list | None]:
    """(messages, tools) to give the chat template: unchanged without tools; else as templates with
    tool support take them, or a TemplateError when this template has none."""
    if not uses_tools(messages, tools):
        return messages, None
    if not renders_tools(tokenizer):
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r}: its chat template does not render tools "
                            "(schemas, calls and results): give the base a template that does (base.chat_template: "
                            "chatml or llama3, or the model's own) or hold tool rows out (split.held_out)")
    return template_messages(messages), template_tools(tools)


def render_chat(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The text of a conversation (canonical messages, with its tools) as the chat template renders it:
    what training, merge, chat/serve and eval all give the model."""
    messages, tools = chat_inputs(tokenizer, messages, tools)
    return _render(tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int, int]]:
    """(start, end, message index) of each non-system message's content in the rendered text, found
    in conversation order. Templates may trim a content, or move the system text elsewhere (Mistral
    puts it before the last user turn), so system messages are not searched and contents trimmed."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = (m.get("content") or "").strip()
        if m["role"] == "system" or not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise TemplateError(f"messages[{i}] ({m['role']}): the chat template does not render its content "
                                "(a role the template drops?)")
        spans.append((start, start + len(content), i))
        cursor = start + len(content)
    return spans


def stop_token_ids(tokenizer) -> list[int]:
    """The token(s) generation stops at: the special token the template puts right after an
    assistant's content (ChatML <|im_end|>, Llama-3 <|eot_id|>, Gemma <end_of_turn>, Mistral </s>,
    GLM-4 the next turn's <|user|>), then the tokenizer's eos if that differs."""
    probe = [{"role": "user", "content": "ping question"}, {"role": "assistant", "content": "pong answer"},
             {"role": "user", "content": "second question"}]
    text = _render(tokenizer, probe)
    ids, offsets = _encode(tokenizer, text)
    answer_end = _content_spans(text, probe)[1][1]
    specials = special_ids(tokenizer)
    after = [t for t, (a, _) in zip(ids, offsets) if a >= answer_end and t in specials]
    if not after:
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r}: its chat template ends an assistant turn "
                            "with no special token, so the model could not learn where to stop")
    stops = [after[0]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


def system_with_tools(tokenizer, messages: list[dict], tools: list | None) -> list[dict]:
    """A prompt's messages with the tools folded into its system message, for renderers that cannot
    pass tools to the template (OpenCompass): rendered without tools they give exactly what
    render_chat(messages, tools) gives. A TemplateError where the template writes tools elsewhere."""
    if not tools:
        return messages
    want = render_chat(tokenizer, messages, tools, add_generation_prompt=True)
    rest = template_messages(messages[1:] if messages and messages[0]["role"] == "system" else messages)
    marker = "\x00system\x00"
    before, _, after = _render(tokenizer, [{"role": "system", "content": marker}, *rest],
                               add_generation_prompt=True).partition(marker)
    if want.startswith(before) and want.endswith(after) and len(before) + len(after) <= len(want):
        folded = [{"role": "system", "content": want[len(before):len(want) - len(after)]}, *rest]
        if _render(tokenizer, folded, add_generation_prompt=True) == want:
            return folded
    raise TemplateError(f"tokenizer {tokenizer.name_or_path!r}: its chat template does not write the tools in the "
                        "system turn, so they cannot be given to a renderer without tools (OpenCompass)")


def _call_turn_end(tokenizer, text: str, messages: list[dict], index: int, tools, start: int, stop_id: int) -> int:
    """Where an assistant turn that calls a tool ends in `text`: the end of its rendering (the
    conversation up to it, a prefix of the whole), before its end-of-turn token and white space."""
    upto = _render(tokenizer, messages[:index + 1], tools=tools)
    if not text.startswith(upto) or len(upto) <= start:
        raise TemplateError(f"messages[{index}] (assistant tool call): the chat template renders the conversation "
                            "up to it differently from the whole, so the call's tokens cannot be found")
    region = text[start:len(upto)]
    stop = tokenizer.convert_ids_to_tokens(stop_id)
    if stop and stop in region:
        region = region[:region.index(stop)]
    return start + len(region.rstrip())


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, stop_id: int | None = None,
                          tools: list | None = None) -> dict:
    """Token ids exactly as the chat template renders `messages` (and `tools`, the functions offered);
    labels on each assistant turn (what the model writes after the template's generation prompt: its
    content or its tool call, and anything the template puts between prompt and content, e.g. GLM-4's
    newline) and the end-of-turn token after it; IGNORE elsewhere (tool results included). A template
    that renders nothing after the final answer (GLM-4) gets the end-of-turn token appended there, so
    the model learns to stop. `stop_id`: stop_token_ids(tokenizer)[0], passed in to save probing per
    conversation."""
    messages, tools = chat_inputs(tokenizer, messages, tools)
    text = _render(tokenizer, messages, tools=tools)
    ids, offsets = _encode(tokenizer, text)
    stop_id = stop_token_ids(tokenizer)[0] if stop_id is None else stop_id
    specials = special_ids(tokenizer)
    labels = [IGNORE] * len(ids)
    spans = {index: (start, end) for start, end, index in _content_spans(text, messages)}
    for index, m in enumerate(messages):
        if m["role"] != "assistant" or not (index in spans or m.get("tool_calls")):
            continue
        # the model's turn starts where the generation prompt ends, when that prompt is a prefix
        # of the rendering (Mistral moves the system text into the last user turn: then it is not)
        prompt = _render(tokenizer, messages[:index], tools=tools, add_generation_prompt=True)
        start, end = spans.get(index, (len(prompt), len(prompt)))
        if text.startswith(prompt) and len(prompt) <= start:
            start = len(prompt)
        if m.get("tool_calls"):
            end = _call_turn_end(tokenizer, text, messages, index, tools, start, stop_id)
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        for i in inside:
            labels[i] = ids[i]
        after = next((i for i in range(inside[-1] + 1, len(ids)) if offsets[i][0] >= end), None)
        if after is not None and ids[after] in specials:
            labels[after] = ids[after]
        elif after is None:
            ids.append(stop_id)
            labels.append(stop_id)
        else:
            raise TemplateError(f"the chat template follows an answer with {tokenizer.decode([ids[after]])!r}, "
                                "not a special token: the end of a turn cannot be learned")
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}
