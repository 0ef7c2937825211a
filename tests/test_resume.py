"""Resume (train.save_every, train.resume; stages/checkpoints.py): a train stage killed with SIGKILL
mid-epoch, after a checkpoint was written, and rerun, ends with the adapter of a run that was never
interrupted, bit for bit, and the same loss curve. The hf backend runs in .venvs/core, the xtuner
backend (mmengine's own resume) in .venvs/xtuner, each in a subprocess as dvc runs it, on a tiny
Qwen2 and 20 conversations (CPU). 20 conversations / 4 a step = 5 steps an epoch, 15 in all; a
checkpoint every 3 steps, so every checkpoint before the last step falls inside an epoch.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_base, color_conversations, write_records
from stages import checkpoints

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {"hf": ROOT / ".venvs/core/bin/python", "xtuner": ROOT / ".venvs/xtuner/bin/python"}
MODULE = {"hf": "stages.train", "xtuner": "stages.train_xtuner"}
STEPS, SAVE_EVERY, KILL_AFTER = 15, 3, 6  # kill once the step-6 checkpoint exists (epoch 2 is steps 6-10)


def params(backend: str, **changes) -> dict:
    # hf: LoRA dropout on, so the run draws random numbers every step and resume must restore them;
    # xtuner: mmengine's resume reseeds instead of restoring RNG states, so it is exact with dropout 0 only
    train = {"backend": backend, "seed": 7, "epochs": 3, "lr": 1.0e-2, "batch_size": 4, "max_length": 128,
             "pack": backend == "hf", "save_every": SAVE_EVERY, "resume": "auto",
             "lora": {"r": 8, "alpha": 16, "dropout": 0.1 if backend == "hf" else 0.0}}
    return {"train": {**train, **changes}}


def command(backend: str, tag: str) -> list[str]:
    saved = f"models/checkpoints-{tag}" + ("/xtuner" if backend == "xtuner" else "")
    return [str(PYTHON[backend]), "-m", MODULE[backend], "--train", "data/split/train.jsonl",
            "--val", "data/split/val.jsonl", "--base", "models/base", "--out", f"models/adapter-{tag}",
            "--metrics", f"metrics/train-{tag}.json", "--loss-plot", f"plots/train_loss-{tag}.csv",
            "--work-dir" if backend == "xtuner" else "--checkpoints", saved]


def env(params_file: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "TUNEPIPE_PARAMS": params_file}


def run(folder: Path, backend: str, tag: str, params_file: str = "params.yaml") -> dict:
    proc = subprocess.run(command(backend, tag), cwd=folder, env=env(params_file), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"stage failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(folder / f"plots/train_loss-{tag}.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    return {"curve": curve, "metrics": json.loads((folder / f"metrics/train-{tag}.json").read_text()),
            "adapter": folder / f"models/adapter-{tag}", "log": proc.stdout + proc.stderr}


def newest_checkpoint(folder: Path, backend: str, tag: str) -> int:
    """The step of the newest complete checkpoint (0: none yet)."""
    if backend == "hf":
        found = checkpoints.checkpoint_steps(folder / f"models/checkpoints-{tag}/hf")
        return found[-1][0] if found else 0
    pointer = folder / f"models/checkpoints-{tag}/xtuner/last_checkpoint"  # written after the .pth is complete
    text = pointer.read_text().strip() if pointer.is_file() else ""
    return int(Path(text).stem.split("_")[1]) if text.endswith(".pth") else 0


def run_and_kill(folder: Path, backend: str, tag: str) -> int:
    """Start the stage, SIGKILL it (its whole process group) as soon as the checkpoint of step
    KILL_AFTER or later exists; returns the newest checkpoint's step at that moment."""
    proc = subprocess.Popen(command(backend, tag), cwd=folder, env=env("params.yaml"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        while newest_checkpoint(folder, backend, tag) < KILL_AFTER:
            assert proc.poll() is None, f"the stage ended (rc {proc.returncode}) before its step-{KILL_AFTER} checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return newest_checkpoint(folder, backend, tag)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module", params=["hf", "xtuner"])
def runs(request, tmp_path_factory):
    backend = request.param
    if not PYTHON[backend].exists():
        pytest.skip(f"{PYTHON[backend].relative_to(ROOT)} missing: build it with ./setup.sh")
    folder = tmp_path_factory.mktemp(f"resume-{backend}")
    convs = color_conversations()
    write_records(folder / "data/split/train.jsonl", convs[:20])
    write_records(folder / "data/split/val.jsonl", convs[20:])
    build_tiny_base(folder / "models/base", convs)
    (folder / "params.yaml").write_text(yaml.safe_dump(params(backend)))
    (folder / "params-lr.yaml").write_text(yaml.safe_dump(params(backend, lr=5.0e-3)))

    whole = run(folder, backend, "whole")
    killed_at = run_and_kill(folder, backend, "killed")
    assert not (folder / "models/adapter-killed").exists()  # it really died before the end
    # the killed run's checkpoints, kept for the changed-params run below
    shutil.copytree(folder / "models/checkpoints-killed", folder / "models/checkpoints-changed")
    resumed = run(folder, backend, "killed")
    changed = run(folder, backend, "changed", "params-lr.yaml")
    return {"backend": backend, "whole": whole, "resumed": resumed, "changed": changed, "killed_at": killed_at}


def test_kill_was_mid_epoch_after_a_checkpoint(runs):
    steps_per_epoch = STEPS // 3
    assert KILL_AFTER <= runs["killed_at"] < STEPS and runs["killed_at"] % steps_per_epoch != 0
    assert "resuming from" in runs["resumed"]["log"]
    if runs["backend"] == "hf":
        assert runs["resumed"]["metrics"]["resumed_from_step"] == runs["killed_at"]
        assert runs["whole"]["metrics"]["resumed_from_step"] == 0


def test_resumed_adapter_equals_uninterrupted_bit_for_bit(runs):
    import torch

    whole, resumed = adapter_tensors(runs["whole"]["adapter"]), adapter_tensors(runs["resumed"]["adapter"])
    assert sorted(whole) == sorted(resumed) and len(whole) > 0
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), f"{name} differs after resume"


def test_resumed_loss_curve_matches(runs):
    whole, resumed = runs["whole"], runs["resumed"]
    assert len(whole["curve"]) == STEPS
    assert resumed["curve"] == whole["curve"]
    for key in ("train_loss_final", "val_loss_before", "val_loss_after", "steps", "train_tokens"):
        assert resumed["metrics"][key] == whole["metrics"][key], key


def test_changed_param_starts_over(runs):
    """The killed run's checkpoints, rerun with another train.lr: the stage says so in one line and
    trains from step 1 (its step-2 loss is the new lr's, not the checkpoint's)."""
    changed, whole = runs["changed"], runs["whole"]
    reason = [line for line in changed["log"].splitlines() if "starting over" in line]
    assert len(reason) == 1 and "train.lr changed (0.01 -> 0.005)" in reason[0], changed["log"][-2000:]
    assert "resuming from" not in changed["log"]
    assert changed["curve"][0] == whole["curve"][0]  # step 1: same seed, same weights
    assert changed["curve"][1]["loss"] != whole["curve"][1]["loss"]  # step 2: after a step at the new lr


def test_fingerprint_names_what_changed(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("a\n")
    before = checkpoints.fingerprint({"lr": 0.01, "save_every": 3, "resume": "auto"}, [data])
    assert checkpoints.mismatch(before, checkpoints.fingerprint(
        {"lr": 0.01, "save_every": 9, "resume": "never"}, [data])) is None  # neither changes what is trained
    assert checkpoints.mismatch(before, checkpoints.fingerprint({"lr": 0.02}, [data])) == "train.lr changed (0.01 -> 0.02)"
    data.write_text("b\n")
    assert checkpoints.mismatch(before, checkpoints.fingerprint({"lr": 0.01}, [data])) == f"{data} changed"
