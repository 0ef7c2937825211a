"""base.trust_remote_code: a model whose classes are code in its own folder, through every stage.

The model (tests/remote_code_fixture.py write_generic_remote) is a tiny Qwen2 under a model_type
transformers does not know, registered only through config.json / tokenizer_config.json
`auto_map`: every load of its config, tokenizer or model without trust_remote_code raises, so
the chain base -> train (hf, and xtuner when .venvs/xtuner exists) -> merge -> register fails
wherever the flag is dropped.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, color_conversations, run_stage, write_params, write_records
from remote_code_fixture import TEXTS, write_generic_remote
from stages.common import StageError, resolve_base

XTUNER_PY = REPO / ".venvs" / "xtuner" / "bin" / "python"


def texts_of(convs: list[list[dict]]) -> list[str]:
    return TEXTS + [m["content"] for messages in convs for m in messages]


def loads_only_with_trust(folder: Path) -> None:
    """Config, tokenizer and model of `folder` load with trust_remote_code=True and raise without."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for load in (AutoConfig.from_pretrained, AutoTokenizer.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="custom code"):
            load(folder)
        assert type(load(folder, trust_remote_code=True)).__module__.startswith("transformers_modules.")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """base (hf, a local remote-code folder, trust_remote_code) -> cpt (off) -> train (hf) -> dpo (off) -> merge."""
    work = tmp_path_factory.mktemp("remote_code")
    convs = color_conversations(follow_ups=False)
    write_records(work / "data/split/train.jsonl", convs[:20])
    write_records(work / "data/split/val.jsonl", convs[20:])
    write_generic_remote(work / "remote_model", texts_of(convs))
    write_params(work, {"base": {"source": "hf", "model_id": str(work / "remote_model"), "trust_remote_code": True},
                        "train": {"batch_size": 4, "max_length": 128}, "merge": {"check_rows": 4}})
    for stage in ("base", "cpt", "train", "dpo", "merge"):
        run_stage(work, stage)
    return work


def test_the_fixture_cannot_load_without_trust_remote_code(chain):
    loads_only_with_trust(chain / "remote_model")


def test_base_records_the_flag_and_every_stage_loads_with_it(chain):
    manifest = json.loads((chain / "models/base/manifest.json").read_text())
    assert manifest["trust_remote_code"] is True and manifest["revision"] is None
    path, load = resolve_base(chain / "models/base")
    assert Path(path) == (chain / "remote_model").resolve() and load == {"revision": None, "trust_remote_code": True}
    # train and merge ran (each loads tokenizer and model of the base, which raise without the flag)
    metrics = json.loads((chain / "metrics/train.json").read_text())
    assert metrics["steps"] == 5 and metrics["val_loss_after"] < metrics["val_loss_before"]
    assert json.loads((chain / "metrics/merge.json").read_text())["max_abs_logit_diff"] < 1e-3


def test_merged_model_ships_its_code_and_loads_with_it(chain):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.remote_code import load_kwargs

    merged = chain / "models/merged"
    for name in ("configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py"):
        assert (merged / name).read_bytes() == (chain / "remote_model" / name).read_bytes(), name
    assert json.loads((merged / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_tiny.TinyForCausalLM"
    loads_only_with_trust(merged)
    assert load_kwargs(merged) == {"trust_remote_code": True}
    model = AutoModelForCausalLM.from_pretrained(merged, **load_kwargs(merged))
    base = AutoModelForCausalLM.from_pretrained(chain / "remote_model", trust_remote_code=True)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():  # the adapter changed the weights
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-4


def test_eval_config_passes_the_flag_for_the_merged_model(chain, tmp_path):
    from stages.eval import EvalParams
    from stages.eval_config import write_config
    from stages.remote_code import load_kwargs

    merged = chain / "models/merged"
    write_config(tmp_path / "oc.py", tmp_path, EvalParams(), [{"abbr": "merged", "path": str(merged),
                                                                **load_kwargs(merged)}], "cpu", ["<|im_end|>"])
    text = (tmp_path / "oc.py").read_text()
    assert text.count("'trust_remote_code': True") == 2  # model_kwargs and tokenizer_kwargs


def test_register_records_that_the_base_runs_its_code(chain, monkeypatch):
    """The version is the adapter plus a reference to its base; the reference says the base needs
    trust_remote_code, so the registered model loads it with its code."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{chain}/mlflow.db")
    # register's gate reads the eval scores (no eval run here)
    (chain / "metrics/eval.json").write_text(json.dumps({"demo_qa": {"base": {"rougeL": 10.0}, "merged": {"rougeL": 60.0}}}))
    run_stage(chain, "register", "--lock", "missing.lock")
    record = json.loads((chain / "registry/record.json").read_text())
    assert record["version"] == 1 and record["base"]["trust_remote_code"] is True


@pytest.mark.skipif(not XTUNER_PY.exists(), reason=".venvs/xtuner is missing: TUNEPIPE_ENVS=xtuner ./setup.sh")
def test_xtuner_backend_loads_the_base_with_its_code(chain):
    params = chain / "params-xtuner.yaml"
    params.write_text(yaml.safe_dump({"train": {"backend": "xtuner", "epochs": 1, "batch_size": 4, "max_length": 128,
                                                "pack": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "TUNEPIPE_PARAMS": str(params)}
    proc = subprocess.run(
        [str(XTUNER_PY), "-m", "stages.train_xtuner", "--train", "data/split/train.jsonl", "--val",
         "data/split/val.jsonl", "--base", "models/base", "--out", "models/adapter-xtuner", "--work-dir",
         "models/checkpoints/xtuner", "--metrics", "metrics/train-xtuner.json", "--loss-plot",
         "plots/train_loss-xtuner.csv"], cwd=chain, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = (chain / "models/checkpoints/xtuner/inputs/xtuner_config.py").read_text()
    tokenizer_part, model_part = config.split("model = dict(")
    assert "trust_remote_code=True" in tokenizer_part.split("tokenizer = dict(")[1]
    assert "trust_remote_code=True" in model_part.split("lora=dict(")[0]
    assert (chain / "models/adapter-xtuner/adapter_model.safetensors").is_file()
    assert json.loads((chain / "metrics/train-xtuner.json").read_text())["steps"] >= 1


# --- the flag itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("revision", ["main", "v1.0", "0123abc", "0123456789abcdef0123456789abcdef0123456"])
def test_trust_remote_code_needs_a_full_sha_for_a_hub_model(workdir, monkeypatch, revision):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # refused before any download is tried
    write_params(workdir, {"base": {"source": "hf", "model_id": "internlm/internlm2_5-7b-chat",
                                    "revision": revision, "trust_remote_code": True}})
    with pytest.raises(StageError) as err:
        run_stage(workdir, "base")
    message = str(err.value)
    assert "\n" not in message and "base.trust_remote_code" in message and "40-hex commit sha" in message
    assert not (workdir / "models/base").exists()


def test_a_full_sha_or_a_local_folder_passes_the_pin_check(tmp_path):
    from stages.remote_code import refuse_unpinned

    refuse_unpinned("internlm/internlm2_5-7b-chat", "0123456789abcdef0123456789abcdef01234567")
    refuse_unpinned(str(tmp_path), "main")


def test_a_remote_code_model_without_the_flag_is_refused_clearly(workdir):
    write_generic_remote(workdir / "remote_model", TEXTS)
    write_params(workdir, {"base": {"source": "hf", "model_id": str(workdir / "remote_model")}})
    with pytest.raises(StageError) as err:
        run_stage(workdir, "base")
    assert "\n" not in str(err.value) and "base.trust_remote_code: true" in str(err.value)
    assert not (workdir / "models/base").exists()
