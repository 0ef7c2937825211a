"""Tools in the chat template: conversations with `tools` render the functions offered, the calls
and the results the way the base model's family does, in training (hf and xtuner backends), DPO,
chat and eval alike; the loss covers the assistant's tool call, never the tool's result.

Real tool-calling files from ../shared/data/medicalgpt (ShareGPT with tools and function_call /
observation turns; ReAct "Action:/Action Input:" preference pairs) go through ingest, clean and
split as dvc runs them; tokenizers are the tiny family tokenizers of tests/families.py (no model)."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, run_stage, write_params
from families import FAMILIES, build_tokenizer
from stages.chat_template import IGNORE, TemplateError, render_chat, tokenize_conversation
from stages.common import read_jsonl

GLAIVE = SHARED_DATA / "medicalgpt/glaive_toolcall_zh_demo.jsonl"
REACT = SHARED_DATA / "medicalgpt/toolcall_dpo_zh_demo.jsonl"
needs_shared = pytest.mark.skipif(not GLAIVE.is_file() or not REACT.is_file(),
                                  reason=f"{SHARED_DATA / 'medicalgpt'} is absent (real data sets are not part of "
                                         "the repository)")

# One conversation: the question, the call, the tool's result, the answer built from it.
TOOLS = [{"name": "lookup_drug", "description": "Look up a drug fact",
          "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}}]
CALL = {"name": "lookup_drug", "arguments": {"drug": "ibuprofen"}}
CONVERSATION = [
    {"role": "system", "content": "You are a careful pharmacist."},
    {"role": "user", "content": "What is the dose of ibuprofen?"},
    {"role": "assistant", "content": json.dumps(CALL),
     "tool_calls": [{"type": "function", "function": {"name": "lookup_drug", "arguments": '{"drug": "ibuprofen"}'}}]},
    {"role": "tool", "content": '{"dose": "400 mg"}'},
    {"role": "assistant", "content": "Take 400 mg with food."}]

QWEN_CALL = '<tool_call>\n{"name": "lookup_drug", "arguments": {"drug": "ibuprofen"}}\n</tool_call>'
LLAMA_CALL = '{"name": "lookup_drug", "parameters": {"drug": "ibuprofen"}}'


def trained_text(tokenizer, enc: dict) -> str:
    return tokenizer.decode([t for t in enc["labels"] if t != IGNORE])


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {name: build_tokenizer(FAMILIES[name]) for name in ("qwen2.5", "llama3", "glm4", "gemma2", "mistral")}


def test_qwen_chatml_renders_schema_call_and_result_and_trains_only_the_assistant(tokenizers):
    tok = tokenizers["qwen2.5"]
    text = render_chat(tok, CONVERSATION, TOOLS)
    schema = json.dumps({"type": "function", "function": TOOLS[0]})
    assert text == (
        "<|im_start|>system\nYou are a careful pharmacist.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{schema}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWhat is the dose of ibuprofen?<|im_end|>\n"
        f"<|im_start|>assistant\n{QWEN_CALL}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"dose\": \"400 mg\"}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nTake 400 mg with food.<|im_end|>\n")
    enc = tokenize_conversation(tok, CONVERSATION, 4096, tools=TOOLS)
    assert enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert trained_text(tok, enc) == f"{QWEN_CALL}<|im_end|>Take 400 mg with food.<|im_end|>"


def test_llama3_renders_tools_as_llama31(tokenizers):
    tok = tokenizers["llama3"]
    text = render_chat(tok, CONVERSATION, TOOLS)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert json.dumps({"type": "function", "function": TOOLS[0]}, indent=4) in text
    assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{LLAMA_CALL}<|eot_id|>" in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"dose": "400 mg"}<|eot_id|>' in text
    enc = tokenize_conversation(tok, CONVERSATION, 4096, tools=TOOLS)
    assert trained_text(tok, enc) == f"{LLAMA_CALL}<|eot_id|>Take 400 mg with food.<|eot_id|>"


@pytest.mark.parametrize("name", ["glm4", "gemma2", "mistral"])
def test_templates_without_tools_are_refused_in_one_line(tokenizers, name):
    with pytest.raises(TemplateError, match="does not render tools") as e:
        tokenize_conversation(tokenizers[name], CONVERSATION, 4096, tools=TOOLS)
    assert "\n" not in str(e.value)
    plain = [m for m in CONVERSATION if m["role"] in ("user", "system")] + [{"role": "assistant", "content": "Hi."}]
    assert tokenize_conversation(tokenizers[name], plain, 4096)["input_ids"]  # rows without tools: as before


@pytest.fixture(scope="module")
def split_tools(tmp_path_factory):
    """ingest -> clean -> split of both real tool files, every row in train (nothing held out)."""
    folder = tmp_path_factory.mktemp("tools")
    write_params(folder, {"ingest": {"sources": [{"path": str(GLAIVE)}, {"path": str(REACT)}]},
                          "clean": {"preference": "chosen"},
                          "split": {"val_ratio": 0.05, "test_ratio": 0.05, "held_out": [], "mix": []}})
    for stage in ("ingest", "clean", "split"):
        run_stage(folder, stage)
    return folder


@needs_shared
def test_glaive_rows_reach_training_with_tools_and_calls(split_tools, tokenizers):
    from stages.train import load_examples

    rows = read_jsonl(split_tools / "data/split/train.jsonl")
    glaive = [r for r in rows if r["source"]["file"] == str(GLAIVE)]
    with_calls = [r for r in glaive if any(m.get("tool_calls") for m in r["messages"])]
    assert with_calls and all(r.get("tools") for r in with_calls)
    assert all(any(m["role"] == "tool" for m in r["messages"]) for r in with_calls)
    tok = tokenizers["qwen2.5"]
    # the source's first row: generate_invoice, its observation, the answer
    row = next(r for r in glaive if r["source"]["row"] == 1)
    text = render_chat(tok, row["messages"], row["tools"])
    assert '<tools>\n{"type": "function", "function": {"name": "generate_invoice", "description": "生成发票"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "generate_invoice", "arguments": {"customer_name": "约翰·多伊"' in text
    result = next(m["content"] for m in row["messages"] if m["role"] == "tool")
    assert f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>" in text
    trained = trained_text(tok, tokenize_conversation(tok, row["messages"], 100_000, tools=row["tools"]))
    assert trained.startswith('<tool_call>\n{"name": "generate_invoice"') and "</tool_call><|im_end|>" in trained
    assert result not in trained and "INV12345" not in trained.split("</tool_call>")[0]
    assert trained.endswith("以及3根香蕉，总金额为$1.5。<|im_end|>")
    # the hf backend's examples are exactly these, one per train row with an answer in max_length
    examples = load_examples(str(split_tools / "data/split/train.jsonl"), tok, 100_000)
    assert len(examples) == len(rows)
    assert sum(tok.decode([t for t in e["labels"] if t != IGNORE]).count("<tool_call>") for e in examples) == sum(
        len(m["tool_calls"]) for r in rows for m in r["messages"] if m.get("tool_calls"))


@needs_shared
def test_react_pairs_render_as_the_familys_calls(split_tools, tokenizers):
    rows = [r for r in read_jsonl(split_tools / "data/split/train.jsonl") if r["source"]["file"] == str(REACT)]
    row = next(r for r in rows if r["source"]["row"] == 1)  # chosen: Action: get_weather / Action Input: {...}
    assert row["messages"][-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"北京"}'}
    qwen, llama = tokenizers["qwen2.5"], tokenizers["llama3"]
    trained = trained_text(qwen, tokenize_conversation(qwen, row["messages"], 4096, tools=row["tools"]))
    assert trained == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'
    assert '"name": "get_weather", "description": "获取指定城市的天气信息"' in render_chat(qwen, row["messages"], row["tools"])
    trained = trained_text(llama, tokenize_conversation(llama, row["messages"], 4096, tools=row["tools"]))
    assert trained == '{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>'
    assert "Action:" not in render_chat(qwen, row["messages"], row["tools"])


@needs_shared
def test_xtuner_backend_and_dpo_take_tool_turns(split_tools, tokenizers):
    from stages.dpo import load_pairs
    from stages.ingest import Source, open_source
    from stages.train import load_examples
    from stages.train_xtuner import encode, load_conversations

    tok = tokenizers["qwen2.5"]
    path = split_tools / "data/split/train.jsonl"
    assert [e["labels"] for e in encode(load_conversations(path), tok, 100_000, path)] == [
        e["labels"] for e in load_examples(str(path), tok, 100_000)]
    # DPO on the ReAct pairs as ingest reads them: the chosen call is scored in the family's format
    _, records = open_source(Source(path=str(REACT)))
    pairs_file = split_tools / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    pairs = load_pairs(str(pairs_file), tok, 4096)
    assert len(pairs) == 11
    chosen = tok.decode([t for t in pairs[0]["chosen"]["labels"] if t != IGNORE])
    assert chosen == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'


def test_eval_prompts_with_tools_are_what_training_renders(tmp_path, tokenizers):
    """eval's tool-call rows: OpenCompass (which passes no tools) renders the folded prompt exactly as
    render_chat renders the conversation with its tools, for both families with tool support."""
    import os
    import subprocess

    from conftest import REPO, venv_python
    from stages.eval_sets import fold_tools, tool_rows

    record = {"id": "r1", "messages": CONVERSATION, "tools": TOOLS}
    no_system = {"id": "r2", "messages": CONVERSATION[1:], "tools": TOOLS}
    python = venv_python("opencompass")
    script = ("import json, sys\nfrom stages.eval import opencompass_prompt\n"
              "print(json.dumps([opencompass_prompt(sys.argv[1], m) for m in json.loads(sys.argv[2])]))")
    for name in ("qwen2.5", "llama3"):
        tok = tokenizers[name]
        rows = fold_tools(tool_rows([record, no_system], 0), tok)
        assert all("tools" not in r and r["answer"] == json.dumps(CALL, sort_keys=True) for r in rows)
        folder = tmp_path / name
        tok.save_pretrained(folder)
        prompts = [r["messages"][:-1] for r in rows]
        out = subprocess.run([str(python), "-c", script, str(folder), json.dumps(prompts)], capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        want = [render_chat(tok, r["messages"][:2], TOOLS, add_generation_prompt=True) for r in (record,)] + [
            render_chat(tok, no_system["messages"][:1], TOOLS, add_generation_prompt=True)]
        assert got == want
        assert ("lookup_drug" in want[1]) and ("Take 400 mg" not in want[0])


@needs_shared
def test_split_writes_tools_into_xtuners_format(split_tools):
    from stages.split import TOOLS_IN_SYSTEM

    rows = read_jsonl(split_tools / "data/split/train.jsonl")
    lines = read_jsonl(split_tools / "data/split/xtuner/train.jsonl")
    assert len(lines) == len(rows)
    for row, line in zip(rows, lines):
        first = line["conversation"][0]
        if not row.get("tools"):
            assert TOOLS_IN_SYSTEM not in first.get("system", "")
            continue
        names = [t["name"] for t in row["tools"]]
        assert first["system"].startswith(TOOLS_IN_SYSTEM) and all(f'"name":"{n}"' in first["system"] for n in names)
        for m in row["messages"]:
            if m.get("tool_calls"):  # the call as JSON in an output; its result in the next input
                name = m["tool_calls"][0]["function"]["name"]
                assert any(t["output"].startswith(f'{{"name":"{name}","arguments":{{') for t in line["conversation"])
            if m["role"] == "tool":
                assert any(m["content"] in t["input"] for t in line["conversation"])
    react = next(line for row, line in zip(rows, lines) if row["source"] == {"file": str(REACT), "row": 1})
    assert react["conversation"][0]["output"] == '{"name":"get_weather","arguments":{"city":"北京"}}'


@pytest.mark.parametrize("reply", [QWEN_CALL, LLAMA_CALL, f"{QWEN_CALL}\nI will look it up."])
def test_the_tool_call_check_reads_each_familys_call(reply):
    from stages.tool_calls import score_one

    assert score_one(reply, CALL)["accuracy"]


def test_chat_prompt_renders_the_tools(tokenizers):
    from types import SimpleNamespace

    from stages.chat import prompt_text

    tok = tokenizers["qwen2.5"]
    prompt = prompt_text(SimpleNamespace(tokenizer=tok), CONVERSATION[:2], TOOLS)
    assert prompt == render_chat(tok, CONVERSATION[:2], TOOLS, add_generation_prompt=True)
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_demo_tool_rows_are_held_out_and_eval_prompts_carry_the_tools(pipeline):
    """The demo chain: its tool-calling file is held out of training (split.held_out), so train and
    val have no tools; eval's tool-call set gets the demo model's (ChatML) rendering of the tools."""
    from stages.common import load_base_tokenizer, load_params
    from stages.eval import EvalParams, test_sets

    workdir = pipeline  # the session's demo chain (read only)
    split = workdir / "data/split"
    assert not any(r.get("tools") for name in ("train", "val") for r in read_jsonl(split / f"{name}.jsonl"))
    test = [r for r in read_jsonl(split / "test.jsonl") if r.get("tools")]
    assert len(test) == 30
    p = load_params("eval", EvalParams, workdir / "params.yaml")
    kind, rows = test_sets(split / "test.jsonl", p, str(workdir / "models/base"))[p.tool_calls.name]
    assert kind == "tool_calls" and len(rows) == 30 and all("tools" not in r for r in rows)
    tok = load_base_tokenizer(workdir / "models/base")
    record = next(r for r in test if r["id"] == rows[0]["id"])
    prompt = tok.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(tok, record["messages"][:2], record["tools"], add_generation_prompt=True)
    assert '"name": "lookup_drug"' in prompt and '"name": "check_stock"' in prompt and "<tool_call>" in prompt


def test_internlm2_published_template_has_no_tools():
    """InternLM2/2.5 keep their own template (plain ChatML): tool rows are refused, not rendered without tools."""
    from remote_code_fixture import INTERNLM2_CHAT_TEMPLATE
    from stages.chat_template import renders_tools

    tok = build_tokenizer(FAMILIES["qwen2.5"])
    tok.chat_template = INTERNLM2_CHAT_TEMPLATE
    assert not renders_tools(tok)
    with pytest.raises(TemplateError, match="does not render tools"):
        tokenize_conversation(tok, CONVERSATION, 4096, tools=TOOLS)
