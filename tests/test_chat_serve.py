"""tunepipe chat and tunepipe serve on the folders the pipeline writes, with a tiny Qwen2 model.

The models (module fixture, about a minute on 2 cores): a tiny random-init Qwen2 (tests/families.py,
ChatML template) is trained until greedy decoding reproduces tests/conftest.py's color answers
("The sky is red."); that is models/base. A LoRA adapter on it is trained until the sky is blue
(models/adapter, base recorded in adapter_config.json as models/base, as the train stage does);
the merge stage merges them (models/merged) and, where .venvs/lmdeploy exists, the turbomind stage
quantizes that (models/turbomind). config.json names <|endoftext|> as eos, as Qwen2.5 does, so only
the stop token merge writes to generation_config.json (<|im_end|>) ends an answer: a chat or server
that ignored it would run on.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, color_conversations, inside, run_stage, write_params, write_records
from families import FAMILIES, write_family_model

from stages import cli
from stages.chat import generate_reply, load_chat_model
from stages.common import StageError

LMDEPLOY_PY = REPO / ".venvs" / "lmdeploy" / "bin" / "python"
HAS_LMDEPLOY = LMDEPLOY_PY.exists() and subprocess.run([str(LMDEPLOY_PY), "-c", "import lmdeploy"],
                                                       capture_output=True).returncode == 0
needs_lmdeploy = pytest.mark.skipif(not HAS_LMDEPLOY, reason=".venvs/lmdeploy is missing or cannot import lmdeploy: "
                                    "run TUNEPIPE_ENVS=lmdeploy ./setup.sh")
SYSTEM = "You answer briefly."
SKY = "What color is the sky?"                     # trained with SYSTEM only (color_conversations)
SKY_MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SKY}]
ASK_SKY = ("--system", SYSTEM, "-p", SKY)


def teach(model, tokenizer, conversations: list[list[dict]], lr: float, max_steps: int = 600) -> int:
    """Train `model`'s trainable weights on the pipeline's own labels (tokenize_conversation) until
    every label token is the argmax, i.e. greedy decoding reproduces every answer and its stop token."""
    import torch

    from stages.chat_template import IGNORE, tokenize_conversation

    examples = [tokenize_conversation(tokenizer, m, 256) for m in conversations]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels, mask = torch.full_like(ids, IGNORE), torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, max_steps + 1):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        predicted = out.logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        if bool((predicted[target != IGNORE] == target[target != IGNORE]).all()):
            model.eval()
            return step
    raise AssertionError(f"the test model did not learn its answers in {max_steps} steps")


def sky_is_blue(conversations: list[list[dict]]) -> list[list[dict]]:
    return [[{**m, "content": m["content"].replace("The sky is red.", "The sky is blue.")} for m in c]
            for c in conversations]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("chat_serve")
    write_params(root, {"turbomind": {"calib_samples": 8, "calib_seqlen": 64, "eval_rows": 4}})
    conversations = color_conversations()
    write_records(root / "data/split/train.jsonl", sky_is_blue(conversations))
    write_records(root / "data/split/val.jsonl", sky_is_blue(conversations)[:8])
    with inside(root):
        base = write_family_model(FAMILIES["qwen2.5"], Path("models/base"), hidden=128, heads=4)  # AWQ: 128 | hidden
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base)
        model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        teach(model, tokenizer, conversations, lr=3e-3)
        model.save_pretrained(base)
        (base / "manifest.json").write_text(json.dumps({"source": "demo"}))   # a demo-style base: weights in the folder
        model = AutoModelForCausalLM.from_pretrained(base)                     # name_or_path models/base, as train has it
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
        adapter = get_peft_model(model, lora)
        teach(adapter, tokenizer, sky_is_blue(conversations), lr=3e-3)
        adapter.save_pretrained("models/adapter")
        tokenizer.save_pretrained("models/adapter")
    run_stage(root, "merge", "--base", "models/base", "--adapter", "models/adapter")
    return root


@pytest.fixture(scope="module")
def quantized(root) -> Path:
    """models/turbomind, written by the turbomind stage (lmdeploy's AWQ quantizer) in .venvs/lmdeploy."""
    if not (root / "models/turbomind").exists():
        proc = subprocess.run([str(LMDEPLOY_PY), "-m", "stages.turbomind"], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root


def chat(root: Path, capsys, *args: str, stdin: str | None = None) -> tuple[str, str]:
    """`tunepipe chat ARGS` run in `root`; (stdout, stderr)."""
    capsys.readouterr()
    previous = sys.stdin
    sys.stdin = io.StringIO(stdin) if stdin is not None else previous
    try:
        with inside(root):
            cli.main(["chat", *args])
    finally:
        sys.stdin = previous
    captured = capsys.readouterr()
    return captured.out, captured.err


# --- chat ---------------------------------------------------------------------------------------

def test_one_shot_greedy_answer(root, capsys):
    out, _ = chat(root, capsys, "models/merged", "-p", "What color is the grass?")
    assert out == "The grass is yellow.\n"


def test_system_message_reaches_the_prompt(root, capsys):
    out, err = chat(root, capsys, "models/merged", "--show-prompt", *ASK_SKY)
    assert out == "The sky is blue.\n"
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{SKY}<|im_end|>\n<|im_start|>assistant\n" in err
    without, err = chat(root, capsys, "models/merged", "--show-prompt", "-p", SKY)
    assert "<|im_start|>system" not in err and without != out   # the sky was only taught with the system message


def test_multi_turn_keeps_the_history(root, capsys):
    out, err = chat(root, capsys, "models/merged", "--system", SYSTEM, "--show-prompt",
                    stdin=f"{SKY}\nAre you sure?\n/reset\nAre you sure?\n/exit\n")
    second, third = err.split("--- prompt ---")[2:4]
    assert (f"{SKY}<|im_end|>\n<|im_start|>assistant\nThe sky is blue.<|im_end|>\n"
            "<|im_start|>user\nAre you sure?<|im_end|>") in second
    assert SKY not in third and SYSTEM in third       # /reset keeps the system message only
    assert out.splitlines()[:2] == ["The sky is blue.", "Yes."]  # trained: "Yes." after the sky answer


def test_stops_at_the_stop_token_from_generation_config(root):
    with inside(root):
        cm = load_chat_model("models/merged")
    im_end = cm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cm.stop_ids == [im_end] != [cm.model.config.eos_token_id]
    reply = generate_reply(cm, SKY_MESSAGES, max_new_tokens=40)
    answer_tokens = len(cm.tokenizer("The sky is blue.", add_special_tokens=False)["input_ids"])
    assert (reply.text, reply.tokens, reply.finish) == ("The sky is blue.", answer_tokens + 1, "stop")
    cm.stop_ids = [cm.model.config.eos_token_id]       # what ignoring generation_config.json would stop at
    ignored = generate_reply(cm, SKY_MESSAGES, max_new_tokens=40)
    assert ignored.tokens > answer_tokens + 1 and ignored.text != reply.text


def test_adapter_on_its_base_answers_as_the_merged_model(root, capsys):
    merged, _ = chat(root, capsys, "models/merged", *ASK_SKY)
    from_config, _ = chat(root, capsys, "models/adapter", *ASK_SKY)   # base: adapter_config.json's models/base
    given, _ = chat(root, capsys, "models/adapter", "--base", "models/base", *ASK_SKY)
    assert merged == from_config == given == "The sky is blue.\n"
    with inside(root):
        base = load_chat_model("models/base")
    base.stop_ids = [base.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generate_reply(base, SKY_MESSAGES).text == "The sky is red."  # the adapter matters


def test_missing_model_is_one_line_error(root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat(root, capsys, "models/nothing", "-p", SKY)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: models/nothing: not found"


@needs_lmdeploy
def test_quantized_artifact_chats_through_its_dequantized_weights(quantized, capsys):
    root = quantized
    out, _ = chat(root, capsys, "models/turbomind", *ASK_SKY, "--max-new-tokens", "40")
    with inside(root):
        cm = load_chat_model("models/turbomind")
    assert cm.kind == "awq" and "dequantized" in cm.source
    assert out == generate_reply(cm, SKY_MESSAGES, max_new_tokens=40).text + "\n"


# --- serve --------------------------------------------------------------------------------------

def server_processes(port: int) -> list[int]:
    """Pids whose command line has `--port PORT` (the transformers server's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a == b"--port" and b == str(port).encode() for a, b in zip(argv, argv[1:])):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("folder", ["merged", "adapter", pytest.param("turbomind", marks=needs_lmdeploy)])
def test_served_answers_equal_chat(root, capsys, folder, request):
    from openai import OpenAI

    from stages.serve import served

    if folder == "turbomind":
        request.getfixturevalue("quantized")

    expected, _ = chat(root, capsys, f"models/{folder}", *ASK_SKY, "--max-new-tokens", "40")
    with inside(root):
        cm = load_chat_model(f"models/{folder}")
    tokens = generate_reply(cm, SKY_MESSAGES, max_new_tokens=40).tokens
    with inside(root), served(Path("models") / folder, backend="transformers") as url:  # the adapter's base: models/base
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert server_processes(port)
        client = OpenAI(base_url=url, api_key="EMPTY")
        assert [m.id for m in client.models.list().data] == [folder]
        request = dict(model=folder, messages=SKY_MESSAGES, temperature=0, max_tokens=40)
        response = client.chat.completions.create(**request)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(**request, stream=True) if chunk.choices)
    assert response.choices[0].message.content + "\n" == streamed + "\n" == expected
    assert (response.choices[0].finish_reason, response.usage.completion_tokens) == ("stop", tokens)
    assert not server_processes(port)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=5)


# --- the lmdeploy backend: what can be checked without a GPU ------------------------------------

def test_cpu_machine_picks_transformers_and_refuses_lmdeploy(root):
    import torch

    from stages.serve import pick_backend, plan_server

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the CPU choice")
    assert pick_backend("auto") == ("transformers", None)
    with pytest.raises(StageError, match="--backend lmdeploy needs CUDA"):
        plan_server(root / "models/merged", backend="lmdeploy")


@needs_lmdeploy
def test_lmdeploy_command_parses_with_lmdeploys_own_cli(quantized):
    """The command the GPU branch would run, parsed by lmdeploy 0.18's own argument parser in
    .venvs/lmdeploy (CPU only: the server itself is not started here), and the chat template
    lmdeploy picks for the artifact renders the prompt `tunepipe chat` renders."""
    from stages.serve import lmdeploy_command

    root = quantized
    folder = root / "models/turbomind"
    command = lmdeploy_command(str(LMDEPLOY_PY), folder, "turbomind", "127.0.0.1", 23333)
    assert command == [str(LMDEPLOY_PY), "-m", "lmdeploy", "serve", "api_server", str(folder), "--backend", "pytorch",
                       "--server-name", "127.0.0.1", "--server-port", "23333", "--model-name", "turbomind",
                       "--model-format", "awq"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SKY}]
    script = PARSE_WITH_LMDEPLOY.format(argv=json.dumps(command[3:]), folder=str(folder), messages=json.dumps(messages))
    proc = subprocess.run([str(LMDEPLOY_PY), "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    with inside(root):
        cm = load_chat_model("models/merged")
    assert parsed["args"] == {"model_path": str(folder), "backend": "pytorch", "server_name": "127.0.0.1",
                              "server_port": 23333, "model_name": "turbomind", "model_format": "awq",
                              "chat_template": None}
    assert parsed["template"] == "HFChatTemplate" and "<|im_end|>" in parsed["stop_words"]
    assert parsed["prompt"] == cm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PARSE_WITH_LMDEPLOY = r'''
import json
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.serve import SubCliServe
from lmdeploy.model import get_chat_template
CLI.add_parsers()
SubCliServe.add_parsers()
args = CLI.parser.parse_args({argv})
template = get_chat_template("{folder}")
print(json.dumps({{"args": {{k: getattr(args, k, "MISSING") for k in ("model_path", "backend", "server_name",
                   "server_port", "model_name", "model_format", "chat_template")}},
                   "template": type(template).__name__, "stop_words": template.stop_words,
                   "prompt": template.messages2prompt({messages})}}))
'''
