"""The chat format, in one place: every stage renders with the base model's own chat template.

The template is the one in the base tokenizer (tokenizer_config.json / chat_template.jinja). The
training ids, the merged tokenizer, lmdeploy (its HFChatTemplate renders with the tokenizer's
template) and OpenCompass (HuggingFacewithChatTemplate) all go through `apply_chat_template`
with it, so they render the same tokens. This module learns from the template itself, never
from one family's strings:
- which tokens a model is trained on: each assistant turn's content and the end-of-turn token
  that follows it (`tokenize_conversation`);
- which token ends an assistant turn, i.e. where generation stops (`stop_token_ids`).
It also holds templates written from the families' published formats, for a base model without
one (`base.chat_template`, e.g. Bloomz) and for the demo model (ChatML). Stdlib only: stages in
every environment import it.
"""
from __future__ import annotations

IGNORE = -100

# Written from each family's published chat format. `chatml` is the demo model's (and Qwen2.5's /
# InternLM2's); the others serve tests and template-less base models named in params.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
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


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: name one in "
                            f"params (base.chat_template: one of {sorted(TEMPLATES)} or a .jinja file)")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


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


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, stop_id: int | None = None) -> dict:
    """Token ids exactly as the chat template renders `messages`; labels on each assistant turn
    (what the model writes after the template's generation prompt: its content, and anything the
    template puts between prompt and content, e.g. GLM-4's newline) and the end-of-turn token
    after it; IGNORE elsewhere. A template that renders nothing
    after the final answer (GLM-4) gets the end-of-turn token appended there, so the model learns
    to stop. `stop_id`: stop_token_ids(tokenizer)[0], passed in to save probing per conversation."""
    text = _render(tokenizer, messages)
    ids, offsets = _encode(tokenizer, text)
    stop_id = stop_token_ids(tokenizer)[0] if stop_id is None else stop_id
    specials = special_ids(tokenizer)
    labels = [IGNORE] * len(ids)
    for start, end, index in _content_spans(text, messages):
        if messages[index]["role"] != "assistant":
            continue
        # the model's turn starts where the generation prompt ends, when that prompt is a prefix
        # of the rendering (Mistral moves the system text into the last user turn: then it is not)
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        if text.startswith(prompt) and len(prompt) <= start:
            start = len(prompt)
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
