"""Contradictions between params.yaml sections stop before any work, each naming its keys."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, deep_update
from stages.common import StageError, load_params
from stages.params_check import check_params
from stages.split import SplitParams

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())
NO_GPU = lambda: False  # noqa: E731  (the machine the contradictions are checked against)


def params(changes: dict) -> dict:
    return deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), changes)


def test_default_params_pass():
    check_params(DEFAULTS, has_cuda=NO_GPU)
    check_params(DEFAULTS)  # this machine, whatever it has: the defaults ask for no GPU


@pytest.mark.parametrize("changes, keys", [
    ({"train": {"quantize": "nf4"}}, ["train.quantize: nf4", "no CUDA GPU"]),
    ({"turbomind": {"device": "cuda"}}, ["turbomind.device: cuda", "no CUDA GPU"]),
    ({"merge": {"device": "cuda"}}, ["merge.device: cuda"]),
    ({"eval": {"device": "cuda"}}, ["eval.device: cuda"]),
    ({"turbomind": {"dtype": "bfloat16"}}, ["turbomind.dtype: bfloat16", "turbomind.device: auto"]),
    ({"eval": {"models": ["base", "merged", "awq"]}}, ["eval.models[2] 'awq': no stage makes it"]),
    ({"split": {"val_ratio": 0.6, "test_ratio": 0.5}}, ["split.val_ratio (0.6) + split.test_ratio (0.5) = 1.1"]),
    ({"split": {"mix": [{"source": "data/raw/*.xlsx", "share": 0.7}, {"source": "data/raw/*.jsonl", "share": 0.6}]}},
     ["split.mix[*].share sum to 1.3"]),
    ({"train": {"backend": "xtuner", "quantize": "nf4"}}, ["train.quantize: nf4", "no CUDA GPU"]),  # xtuner's QLoRA too
    ({"clean": {"judge": {"enabled": True, "model": ""}}}, ["clean.judge.enabled: true", "clean.judge.model is empty"]),
], ids=["nf4-cpu", "turbomind-cuda", "merge-cuda", "eval-cuda", "turbomind-bf16-auto", "eval-unknown-model",
        "split-ratios", "mix-shares", "xtuner-nf4", "judge-no-model"])
def test_each_contradiction_stops_naming_its_keys(changes, keys):
    with pytest.raises(StageError) as e:
        check_params(params(changes), "p.yaml", has_cuda=NO_GPU)
    message = str(e.value)
    assert message.startswith("p.yaml: 1 contradicting param(s):")
    for key in keys:
        assert key in message


def test_gpu_settings_pass_where_there_is_one():
    check_params(params({"train": {"quantize": "nf4"}, "turbomind": {"device": "cuda", "dtype": "bfloat16"},
                         "merge": {"device": "cuda"}, "eval": {"device": "cuda"}}), has_cuda=lambda: True)


def test_every_problem_in_one_error_and_no_torch_asked_without_gpu_settings():
    asked = []
    with pytest.raises(StageError) as e:
        check_params(params({"split": {"val_ratio": 0.9, "test_ratio": 0.2}, "eval": {"models": ["x"]}}),
                     has_cuda=lambda: asked.append(1) or False)
    assert str(e.value).count("\n") == 2 and "split.val_ratio" in str(e.value) and "eval.models[0] 'x'" in str(e.value)
    assert asked == []  # no GPU setting: has_cuda (torch) never consulted


def test_every_stage_checks_before_its_work(tmp_path):
    """load_params (every stage's first step) raises for another section's contradiction."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params({"eval": {"models": ["base", "gptq"]}})))
    with pytest.raises(StageError, match=r"eval.models\[1\] 'gptq': no stage makes it"):
        load_params("split", SplitParams, path)


def test_check_params_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params({"split": {"val_ratio": 0.5, "test_ratio": 0.5}})))
    run = lambda *a: subprocess.run([sys.executable, "-m", "stages.cli", "check-params", *a], cwd=REPO,
                                    capture_output=True, text=True)
    ok, failed = run("--params", str(REPO / "params.yaml")), run("--params", str(bad))
    assert ok.returncode == 0 and "no contradictions" in ok.stdout
    assert failed.returncode == 1
    assert f"{bad}: split.val_ratio (0.5) + split.test_ratio (0.5) = 1: must stay under 1" in failed.stderr


# --- several processes (train.devices, train.sharding) ----------------------------------------------

@pytest.mark.parametrize("train, gpus, deepspeed, expected", [
    ({"devices": 4, "sharding": "ddp"}, 2, True, ["train.devices: 4 processes, one a GPU, but 2 CUDA GPU(s)"]),
    ({"devices": 2, "sharding": "ddp"}, 0, True, ["(train.device: cpu runs them as CPU processes)"]),
    ({"devices": 2, "sharding": "ddp", "device": "cpu"}, 0, True, []),  # two gloo processes
    ({"devices": 2, "sharding": "zero2", "device": "cpu"}, 0, False, ["train.sharding: zero2 needs deepspeed"]),
    ({"devices": 2, "sharding": "zero3"}, 2, True, []),
    ({"device": "cuda"}, 0, True, ["train.device: cuda, but no CUDA GPU"]),
    ({"backend": "xtuner", "devices": 2, "sharding": "ddp", "device": "cpu"}, 0, True, ["xtuner backend's processes"]),
])
def test_processes_against_the_machine(train, gpus, deepspeed, expected):
    ask = params({"train": train})
    if not expected:
        check_params(ask, has_cuda=NO_GPU, gpus=lambda: gpus, deepspeed=lambda: deepspeed)
        return
    with pytest.raises(StageError) as e:
        check_params(ask, "p.yaml", has_cuda=NO_GPU, gpus=lambda: gpus, deepspeed=lambda: deepspeed)
    assert all(text in str(e.value) for text in expected), str(e.value)


@pytest.mark.parametrize("train, message", [
    ({"devices": 2}, "devices: 2 needs a sharding"),
    ({"devices": 0, "sharding": "ddp"}, "devices must be auto or at least 1"),
    ({"devices": 2, "sharding": "ddp", "step_tokens": "auto"}, "step_tokens: auto measures one device"),
    ({"devices": 2, "sharding": "fsdp2", "quantize": "nf4"}, "4-bit weights shard with ddp only"),
    ({"devices": 2, "sharding": "zero3", "loss_chunk_size": 4096}, "zero3 gathers lm_head only in its forward"),
    ({"backend": "xtuner", "devices": 2, "sharding": "fsdp2"}, "xtuner runs ddp, zero2 or zero3"),
])
def test_train_params_refuse_contradictions(train, message):
    from pydantic import ValidationError

    from stages.train import TrainParams

    with pytest.raises(ValidationError, match=message):
        TrainParams(**train)
    assert TrainParams(devices="auto", sharding="fsdp2").devices == "auto"
    assert TrainParams(devices=2, sharding="zero2", loss_chunk_size=4096).sharding == "zero2"
