"""base, train (hf backend), merge: real models, exact losses, and the one chat template."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, run_stage, write_params
from stages.common import CHAT_TEMPLATE, CPU_MATH_PIN, IM_END, read_jsonl, render_chatml
from stages.train import IGNORE, tokenize_conversation
from stages.train_batches import collate

# Recorded from this code on the CPU build of torch 2.13.0; the computation is seeded end to end
# and the CPU math pinned (stages/common.py pin_cpu_math), so every x86-64 machine gets these bits.
# Under the CPU math pin (stages/common.py) every run on one processor type gives the same bits, but two types
# still differ in the last digit: 2.364463 on AMD EPYC (Zen 4), 2.364464 on Intel Xeon (Sapphire Rapids)
# (benchmarks/results/cpu_determinism_2cpu_*.json). Unpinned, the same code spreads over 2.364292..2.364477,
# so a tolerance of 1.5e-6 around their middle still fails when the pin is lost.
EXPECTED_TRAIN_LOSS_FINAL = 2.3644635


def test_base_model_has_the_chat_template_and_stop_token(pipeline):
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    model = AutoModelForCausalLM.from_pretrained(pipeline / "models/base")
    manifest = json.loads((pipeline / "models/base/manifest.json").read_text())
    assert manifest["source"] == "demo" and manifest["architecture"] == "Qwen2ForCausalLM"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == IM_END
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    config = json.loads((pipeline / "models/base/tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x envs too


def test_training_tokens_are_the_chat_template_tokens(pipeline):
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    for record in read_jsonl(pipeline / "data/split/train.jsonl")[:20]:
        example = tokenize_conversation(tokenizer, record["messages"], 512)
        rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert rendered == render_chatml(record["messages"])
        assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        labelled = tokenizer.decode([t for t in example["labels"] if t != IGNORE])
        assert labelled == record["messages"][-1]["content"] + IM_END  # the answer and its stop token only


def test_packed_loss_equals_unpacked_loss(pipeline):
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    model = AutoModelForCausalLM.from_pretrained(pipeline / "models/base", attn_implementation="sdpa").eval()
    examples = [tokenize_conversation(tokenizer, r["messages"], 512)
                for r in read_jsonl(pipeline / "data/split/train.jsonl")[:12]]
    with torch.no_grad():
        padded = model(**collate(examples, False, 512, tokenizer.pad_token_id), use_cache=False).loss
        packed_batch = collate(examples, True, 512, tokenizer.pad_token_id)
        packed = model(**packed_batch, use_cache=False).loss
        # the same rows with positions NOT restarting: documents attend to each other
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).expand_as(packed_batch["input_ids"]))
        leaking = model(**leaky, use_cache=False).loss
    assert packed_batch["input_ids"].shape[0] < len(examples)  # really packed
    assert abs(packed.item() - padded.item()) < 1e-5
    assert abs(leaking.item() - padded.item()) > 1e-3


def test_train_is_seeded_and_learns(pipeline):
    metrics = json.loads((pipeline / "metrics/train.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 1.0
    assert metrics["train_loss_final"] == pytest.approx(EXPECTED_TRAIN_LOSS_FINAL, abs=1.5e-6)
    curve = (pipeline / "plots/train_loss.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss" and len(curve) - 1 == metrics["steps"]


def test_adapter_loads_and_changes_the_model(pipeline):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(pipeline / "models/base").eval()
    ids = torch.tensor([[1, 5, 9, 14, 22]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, pipeline / "models/adapter").eval()
        after = tuned(ids).logits
    assert (before - after).abs().max() > 1e-3


def test_merged_model_matches_base_plus_adapter(pipeline):
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(pipeline / "models/merged").eval()
    base = AutoModelForCausalLM.from_pretrained(pipeline / "models/base").eval()
    tuned = PeftModel.from_pretrained(base, pipeline / "models/adapter").eval()
    ids = torch.tensor([[1, 5, 9, 14, 22, 30]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/merged")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    generation = json.loads((pipeline / "models/merged/generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids(IM_END) in generation["eos_token_id"]
    assert (pipeline / "models/merged/model.safetensors").exists()
    assert json.loads((pipeline / "metrics/merge.json").read_text())["max_abs_logit_diff"] < 1e-3


def test_merged_model_answers_in_the_trained_format(pipeline):
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/merged")
    model = AutoModelForCausalLM.from_pretrained(pipeline / "models/merged").eval()
    record = read_jsonl(pipeline / "data/split/test.jsonl")[0]
    prompt = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=40)
    assert out[0, -1].item() in model.generation_config.eos_token_id  # stops on its own at <|im_end|>


def test_xtuner_backend_is_dispatched_to_its_environment(workdir):
    # in a folder without .venvs/xtuner the stage must say how to create it, not train with hf
    write_params(workdir, {"train": {"backend": "xtuner"}})
    from stages.common import StageError

    with pytest.raises(StageError, match=r"\.venvs/xtuner/bin/python: missing; run TUNEPIPE_ENVS=xtuner"):
        run_stage(workdir, "train")


def test_reloaded_tokenizer_tokenizes_as_trained(pipeline):
    # transformers rebuilds a qwen2 model's tokenizer on load; it must still match tokenizer.json
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(pipeline / "models/base/tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(pipeline / "models/merged")
    for text in ["Take 2 tablets of tintinxi 500mg, it's fine.\n\nOK", "  What's the dose?\u00a0\tSure:  10 mg\n"]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


# One full training step (no LoRA) of a small Qwen2 in a fresh process that starts as a stage does
# (`import stages` first): the printed settings, then a hash of the loss, gradients and updated weights.
STEP_PROBE = """
import hashlib, os
import stages
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), os.environ.get("MKL_CBWR"),
      os.environ.get("ONEDNN_MAX_CPU_ISA"))
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
ids = torch.randint(0, 1024, (8, 128))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
torch.optim.AdamW(model.parameters(), lr=1e-3).step()
digest = hashlib.sha256(loss.detach().numpy().tobytes())
for p in model.parameters():
    digest.update(p.grad.numpy().tobytes())
    digest.update(p.detach().numpy().tobytes())
print(digest.hexdigest())
"""
KNOBS = [*CPU_MATH_PIN, "OMP_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "TUNEPIPE_PIN_CPU_MATH"]


def step_in_fresh_process(**env: str) -> tuple[str, str]:
    """(settings, bits) of STEP_PROBE run with `env` on top of an environment with no knob set."""
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    out = subprocess.run([sys.executable, "-c", STEP_PROBE], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return out[-2], out[-1]


def test_cpu_math_is_pinned_in_this_process():
    # conftest imports stages before any test module imports torch, as a stage process does
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert torch.get_num_threads() == 2
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_cpu_math_pin_fixes_the_bits_in_stage_processes():
    settings, pinned = step_in_fresh_process()  # nothing in the environment: `import stages` pins
    assert settings == "AVX2 2 COMPATIBLE AVX2"
    # the pin's values given by hand, and MKL told the processor has no AVX-512: the same bits
    assert step_in_fresh_process(**CPU_MATH_PIN, MKL_ENABLE_INSTRUCTIONS="AVX2")[1] == pinned
    # a user's value is kept, and each of these changes the bits (ATen's kernels; MKL's GEMM)
    for knob, value, expected in [("ATEN_CPU_CAPABILITY", "default", "DEFAULT 2 COMPATIBLE AVX2"),
                                  ("MKL_CBWR", "AUTO", "AVX2 2 AUTO AVX2")]:
        settings, bits = step_in_fresh_process(**{knob: value})
        assert settings == expected
        assert bits != pinned, knob


def test_cpu_thread_count_is_the_pins_or_the_users():
    # torch's thread count follows MKL_NUM_THREADS (pinned, or OMP_NUM_THREADS when a user set it),
    # whatever the number of cores: 3 threads here on a 2-core machine
    probe = "import stages, torch; print(torch.get_num_threads())"
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**clean, "OMP_NUM_THREADS": "3"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3"]
