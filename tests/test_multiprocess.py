"""Several processes (train.devices, train.sharding; stages/distributed.py) on a CPU: the train
stage started with devices 2 re-launches itself under torchrun as two gloo processes, each
training on its half of every step. Same tiny model, data and global steps as one process:
the loss curve must match, and rank 0 alone writes one adapter that peft loads.

Tolerance: the two-process step computes the same sum of per-token losses, split in two halves
(each rank's mean x its share of the step's labelled tokens) and its LoRA gradients summed by
all-reduce, so only the order of float32 additions differs; per step that is a relative error
of order 1e-7, and AdamW with lr 1e-2 over 8 steps lets it grow (an update's size does not
depend on the gradient's scale, so tiny gradient differences can flip near-zero elements).
Measured here (ddp and fsdp2): the curves agree to 2e-6, the loss file's own rounding (6 decimals; run
with -s for the RESULTS line); asserted: 1e-4 absolute,
which a wrong split or weighting (e.g. a plain mean of the ranks' means, or half the batch
each step twice) exceeds by orders of magnitude (checked by the weighting test).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_base, color_conversations, write_records
from stages import distributed

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venvs/core/bin/python"
TOLERANCE = 1e-4


def params(**changes) -> dict:
    # dropout 0: the two runs draw different dropout masks otherwise; save_every 0: sharded runs make none
    train = {"backend": "hf", "seed": 3, "epochs": 2, "lr": 1.0e-2, "batch_size": 5, "max_length": 128,
             "pack": True, "save_every": 0, "device": "cpu", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return {"train": {**train, **changes}}


def run(folder: Path, tag: str, **changes) -> dict:
    (folder / f"params-{tag}.yaml").write_text(yaml.safe_dump(params(**changes)))
    cmd = [str(PYTHON), "-m", "stages.train", "--train", "data/split/train.jsonl", "--val", "data/split/val.jsonl",
           "--base", "models/base", "--out", f"models/adapter-{tag}", "--checkpoints", f"models/checkpoints-{tag}",
           "--metrics", f"metrics/train-{tag}.json", "--loss-plot", f"plots/train_loss-{tag}.csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "TUNEPIPE_PARAMS": f"params-{tag}.yaml",
           "OMP_NUM_THREADS": "1"}
    # 20 minutes: on a 2-core machine under a load of 15 one zero2 run took ~5 minutes, another did not end in 10
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"stage failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(folder / f"plots/train_loss-{tag}.csv", newline="") as f:
        curve = [float(row["loss"]) for row in csv.DictReader(f)]
    return {"curve": curve, "metrics": json.loads((folder / f"metrics/train-{tag}.json").read_text()),
            "adapter": folder / f"models/adapter-{tag}", "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not PYTHON.exists():
        pytest.skip(".venvs/core missing: build it with ./setup.sh")
    folder = tmp_path_factory.mktemp("multiprocess")
    convs = color_conversations(follow_ups=True)
    write_records(folder / "data/split/train.jsonl", convs[:19])  # 4 steps an epoch, the last one of 4
    write_records(folder / "data/split/val.jsonl", convs[19:])
    build_tiny_base(folder / "models/base", convs)
    return folder


@pytest.fixture(scope="module")
def one(folder):
    return run(folder, "one")


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_match_one(folder, one, sharding):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    two = run(folder, sharding, devices=2, sharding=sharding)
    assert "2 processes under torchrun" in two["log"]
    assert two["metrics"]["processes"] == 2 and two["metrics"]["sharding"] == sharding
    assert len(two["curve"]) == len(one["curve"]) == 8
    gap = max(abs(a - b) for a, b in zip(one["curve"], two["curve"]))
    print(f"RESULTS {sharding}: max |loss(2 processes) - loss(1)| over {len(one['curve'])} steps = {gap:.2e}; "
          f"val_loss_after {two['metrics']['val_loss_after']} vs {one['metrics']['val_loss_after']}")
    assert gap < TOLERANCE, (one["curve"], two["curve"])
    assert one["curve"][-1] < one["curve"][0] - 0.1  # it learned something, so the match is not trivial
    assert abs(two["metrics"]["val_loss_after"] - one["metrics"]["val_loss_after"]) < TOLERANCE
    assert two["metrics"]["train_tokens"] == one["metrics"]["train_tokens"]  # the same global steps

    # one adapter (rank 0's; no temp folders left by the other rank), whole, loadable by peft
    adapters = sorted(p.name for p in folder.glob("models/adapter-*"))
    assert f"adapter-{sharding}" in adapters and not [a for a in adapters if "tmp" in a or a.startswith(".")]
    ours, theirs = load_file(str(two["adapter"] / "adapter_model.safetensors")), \
        load_file(str(one["adapter"] / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-3
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "models/base"), two["adapter"])
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_shards_are_balanced_disjoint_and_weighted_to_the_step_mean():
    examples = [{"input_ids": [0] * n, "labels": [-100] * (n // 2) + [1] * (n - n // 2)} for n in (9, 7, 5, 4, 3)]
    step = [0, 1, 2, 3, 4]
    ranks = [distributed.shard(step, examples, r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == step and not set(ranks[0]) & set(ranks[1])
    assert ranks == [[0, 3], [1, 2, 4]]  # longest first to the lighter rank: 9+4 tokens against 7+5+3
    group = lambda rank: distributed.Group(rank, 2, None, "ddp")  # noqa: E731
    weights = [distributed.local_step(step, examples, group(r))[1] for r in range(2)]
    total = sum(distributed.labelled(e) for e in examples)
    # mean over ranks of weight x (rank's mean) == the step's mean: weights are 2 x each rank's token share
    assert weights == [2 * sum(distributed.labelled(examples[i]) for i in ranks[r]) / total for r in range(2)]
    assert sum(weights) == pytest.approx(2)
    # a step with fewer conversations than ranks: the idle rank runs one with weight 0
    assert distributed.local_step([2], examples, group(1)) == ([examples[2]], 0.0)


def test_torchrun_command():
    cmd = distributed.torchrun_command(4, "stages.train", ["--out", "x"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "stages.train",
                       "--out", "x"]


def test_throughput_benchmark_runs_on_one_cpu_process(tmp_path):
    """benchmarks/train_throughput.py --devices: the code path runs (a tiny model, one process);
    GPU numbers come only from a machine with several GPUs."""
    proc = subprocess.run([str(PYTHON), str(ROOT / "benchmarks/train_throughput.py"), "--devices", "1", "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "train_scaling_fsdp2.json").read_text())
    run = report["workloads"]["smoke"]["runs"][0]
    assert run["devices"] == 1 and run["sharding"] == "none" and run["tokens_per_s"] > 0 and run["timed_steps"] == 3
    assert report["workloads"]["smoke"]["scaling_efficiency"] == {"1": 1.0}


def test_scaling_efficiency_is_tokens_per_s_over_n_times_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_scaling import efficiency

    runs = [{"devices": 1, "tokens_per_s": 1000.0}, {"devices": 2, "tokens_per_s": 1900.0},
            {"devices": 4, "tokens_per_s": 3000.0}, {"devices": 8, "failed": "exit status 1"}]
    assert efficiency(runs) == {"1": 1.0, "2": 0.95, "4": 0.75}
    assert efficiency(runs[1:]) == {}  # nothing to compare against without N=1
