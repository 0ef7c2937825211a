"""train, xtuner backend (stages/train_xtuner.py), end to end in its own environment.

A tiny Qwen2 (stages.base.build_tiny_model) and ~20 tiny conversations in a temporary folder;
the stage runs twice in .venvs/xtuner through a subprocess, as dvc runs it. Checked here, in the
env that runs pytest: the adapter loads with PeftModel.from_pretrained and changes the model's
output; the loss curve has a row per step and goes down; the same seed gives the same losses;
xtuner's tokens are the chat template's tokens. About a minute on two CPU cores.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_base, color_conversations, write_records

ROOT = Path(__file__).resolve().parents[1]
XTUNER_PY = ROOT / ".venvs" / "xtuner" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not XTUNER_PY.exists(),
    reason=f"{XTUNER_PY.relative_to(ROOT)} missing: build it with `TUNEPIPE_ENVS=xtuner ./setup.sh`",
)

PARAMS = {"train": {"backend": "xtuner", "seed": 7, "epochs": 3, "lr": 1.0e-2, "batch_size": 4,
                    "max_length": 128, "pack": False, "warmup_ratio": 0.1,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}}
ARGS = ["--train", "data/split/train.jsonl", "--val", "data/split/val.jsonl", "--base", "models/base",
        "--work-dir", "models/checkpoints/xtuner"]

def run_stage(folder: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(XTUNER_PY), "-m", "stages.train_xtuner", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train(folder: Path, tag: str, timeout: int = 300) -> dict:
    proc = run_stage(folder, *ARGS, "--out", f"models/adapter-{tag}", "--metrics", f"metrics/train-{tag}.json",
                     "--loss-plot", f"plots/train_loss-{tag}.csv", timeout=timeout)
    assert proc.returncode == 0, f"stage failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(folder / f"plots/train_loss-{tag}.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    return {"metrics": json.loads((folder / f"metrics/train-{tag}.json").read_text()), "curve": curve,
            "adapter": folder / f"models/adapter-{tag}", "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xtuner")
    convs = color_conversations()
    write_records(folder / "data/split/train.jsonl", convs[:20])
    write_records(folder / "data/split/val.jsonl", convs[20:])
    build_tiny_base(folder / "models/base", convs)
    (folder / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    first = train(folder, "a")
    second = train(folder, "b")  # same work dir: the stage clears the first run's checkpoints
    return folder, first, second


def test_adapter_is_peft_safetensors_and_changes_the_model(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, first, _ = trained
    adapter = first["adapter"]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16

    base = folder / "models/base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What color is the sky?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = model(**ids).logits
        adapted = PeftModel.from_pretrained(model, str(adapter)).eval()
        after = adapted(**ids).logits
    assert (after - before).abs().max().item() > 1e-2


def test_loss_curve_has_every_step_and_goes_down(trained):
    _, first, _ = trained
    curve, metrics = first["curve"], first["metrics"]
    assert list(curve[0]) == ["step", "epoch", "loss"]
    steps = [int(r["step"]) for r in curve]
    assert steps == list(range(1, metrics["steps"] + 1)) and metrics["steps"] == 15  # 20 convs / 4 x 3 epochs
    assert [int(r["epoch"]) for r in curve] == [1] * 5 + [2] * 5 + [3] * 5
    losses = [float(r["loss"]) for r in curve]
    first_epoch, last_epoch = sum(losses[:5]) / 5, sum(losses[-5:]) / 5  # batches of 4 are noisy
    assert last_epoch < first_epoch - 0.3
    assert metrics["train_loss_final"] == pytest.approx(losses[-1])
    assert metrics["val_loss_after"] < metrics["val_loss_before"]


def test_metrics_are_numbers_named_like_the_hf_backend(trained):
    _, first, _ = trained
    metrics = first["metrics"]
    for key in ["train_loss_final", "val_loss_before", "val_loss_after", "steps", "train_tokens", "tokens_per_s",
                "runtime_s", "peak_memory_mb", "trainable_params"]:
        assert key in metrics
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["tokens_per_s"] > 0 and metrics["trainable_params"] > 0


def test_same_seed_same_losses(trained):
    _, first, second = trained
    assert second["metrics"]["train_loss_final"] == first["metrics"]["train_loss_final"]
    assert [r["loss"] for r in second["curve"]] == [r["loss"] for r in first["curve"]]


def test_generated_config_is_kept_and_runs_are_not_mixed(trained):
    folder, _, second = trained
    work = folder / "models/checkpoints/xtuner"
    config = (work / "inputs/xtuner_config.py").read_text()
    assert "randomness = dict(seed=seed" in config and "seed = 7" in config
    assert "do_dataset_tokenization=False" in config and "template_map_fn=None" in config
    assert len([d for d in work.iterdir() if d.is_dir() and d.name[:1].isdigit()]) == 1  # one run's logs
    assert "shims applied" in second["log"]


XTUNER_TOKENS_SCRIPT = r"""
import json, sys
from stages import shims
shims.apply("xtuner")
from transformers import AutoTokenizer
from stages.train_xtuner import encode, load_conversations
from xtuner.dataset import process_hf_dataset
from datasets import load_dataset
tokenizer = AutoTokenizer.from_pretrained("models/base")
# what xtuner's own dataset pipeline makes of the stage's input file, as the generated config asks
dataset = process_hf_dataset(dataset=load_dataset("json", data_files={"train": "models/checkpoints/xtuner/inputs/train.jsonl"}),
                             tokenizer=tokenizer, max_length=10_000, dataset_map_fn=None, template_map_fn=None,
                             do_dataset_tokenization=False, pack_to_max_length=False, map_num_proc=1)
out = []
for conversation, row in zip(load_conversations(__import__("pathlib").Path("data/split/train.jsonl")), dataset):
    template = tokenizer.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True)["input_ids"]
    trained_text = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l >= 0])
    out.append({"same": row["input_ids"] == list(template), "trained": trained_text})
print("TOKENS=" + json.dumps({"rows": out}))
"""


def test_xtuner_trains_on_the_chat_template_tokens(trained):
    """One chat template: xtuner's dataset pipeline, fed the stage's input file, gives exactly the
    tokens of the base tokenizer's apply_chat_template, with the loss on the answers and their <|im_end|>."""
    folder, _, _ = trained
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(XTUNER_PY), "-c", XTUNER_TOKENS_SCRIPT], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS=")), None)
    assert line, proc.stderr[-3000:]
    rows = json.loads(line[len("TOKENS="):])["rows"]
    convs = color_conversations()[:20]  # the train split the fixture writes
    assert len(rows) == 20 and all(r["same"] for r in rows)
    for row, messages in zip(rows, convs):
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert row["trained"] == "".join(answers)




def test_several_processes_launch_like_xtuner_train_with_deepspeed():
    """train.devices N: what `NPROC_PER_NODE=N xtuner train CONFIG --deepspeed deepspeed_zeroN`
    runs (torchrun on xtuner's train tool, --launcher pytorch), through stages.shims; each process
    takes 1/N of the step's rows, so the global step stays the one-process one."""
    from stages.train import TrainParams
    from stages.train_xtuner import launch_command, plan_steps

    cmd = launch_command(4, Path("w/inputs/xtuner_config.py"), Path("w"), Path("w/inputs/deepspeed_zero2.json"))
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "stages.shims",
                       "xtuner.tools.train", "w/inputs/xtuner_config.py", "--work-dir", "w",
                       "--deepspeed", "w/inputs/deepspeed_zero2.json", "--launcher", "pytorch"]
    assert "--deepspeed" not in launch_command(2, Path("c.py"), Path("w"), None)
    encoded = [{"input_ids": [1] * 10, "labels": [1] * 10}] * 40
    p = TrainParams(backend="xtuner", batch_size=8, pack=False, epochs=1)
    one, four = plan_steps(p, encoded), plan_steps(p, encoded, nproc=4)
    assert (one["batch_rows"], one["steps_per_epoch"]) == (8, 5)
    assert (four["batch_rows"], four["steps_per_epoch"]) == (2, 5)  # 4 processes x 2 rows = the same 8 a step


@pytest.mark.skipif(os.environ.get("TUNEPIPE_SLOW") != "1", reason="about 14 min on 2 cores (DeepSpeed builds its "
                    "CPU communication op on first use): TUNEPIPE_SLOW=1 runs it")
def test_deepspeed_zero2_through_xtuners_flag_on_one_cpu_process(trained):
    """train.deepspeed zero2: xtuner's own --deepspeed runs DeepSpeed's ZeRO-2 engine in one process
    (a one-process torch.distributed group, fp32 on CPU), and the stage still writes the adapter and
    metrics as without it; pack true without flash-attn trains unpacked, saying so."""
    folder, _, _ = trained
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"] = {**params["train"], "epochs": 1, "deepspeed": "zero2", "pack": True}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        run = train(folder, "zero2", timeout=1800)  # the first run builds DeepSpeed's CPU comm op (minutes)
    finally:
        (folder / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    work = folder / "models/checkpoints/xtuner"
    assert json.loads((work / "inputs/deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2
    assert "warning: train.pack ignored, trained unpacked" in run["log"]
    assert "pack_to_max_length = False" in (work / "inputs/xtuner_config.py").read_text()
    assert "DeepSpeedStrategy" in (work / "xtuner_config.py").read_text()  # the config mmengine ran
    assert (run["adapter"] / "adapter_model.safetensors").is_file()
    assert run["metrics"]["steps"] == 5 and run["metrics"]["val_loss_after"] < run["metrics"]["val_loss_before"]
