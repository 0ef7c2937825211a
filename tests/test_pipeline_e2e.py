"""End to end, as a user runs it: `dvc repro` in a fresh git checkout, then an experiment.

Slow (a few minutes): every stage in its real environment, with FAST_PARAMS. The checkout is the
session's full_run (tests/conftest.py), the LLM judge on against a local stub, shared with test_secrets.
"""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_checkout, sh


@pytest.fixture(scope="module")
def checkout(full_run):
    """The session's shared full run (tests/conftest.py full_run; test_secrets reads it too). The tests
    below run in file order: the first sees it as `dvc repro` left it; the experiment and the eval
    param tests then change it."""
    return full_run


def test_repro_runs_every_stage_then_nothing(checkout):
    root, env, first = checkout
    for stage in ["demo_data", "ingest", "clean", "split", "base", "train", "merge", "turbomind", "eval", "register",
                  "review", "upload"]:
        assert f"Running stage '{stage}'" in first
    assert "up to date" in sh(root, ".venvs/core/bin/dvc", "status", env=env)
    second = sh(root, ".venvs/core/bin/dvc", "repro", env=env)
    assert "Running stage" not in second


def test_outputs_are_what_the_next_tools_load(checkout):
    root, _, _ = checkout
    config = json.loads((root / "models/turbomind/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and config["quantization_config"]["bits"] == 4
    scores = json.loads((root / "metrics/eval.json").read_text())
    dataset = next(iter(scores))
    metric = next(iter(scores[dataset]["merged"]))
    assert scores[dataset]["merged"][metric] > scores[dataset]["base"][metric]
    record = json.loads((root / "registry/record.json").read_text())
    receipt = json.loads((root / "upload/receipt.json").read_text())
    assert receipt["model_uri"] == record["model_uri"]
    assert (root / receipt["destination"] / "README.md").exists()
    for report in ["registry/review.html", "registry/review.md"]:
        assert f"Review: {record['model_name']} version {record['version']}" in (root / report).read_text()


def test_mlflow_holds_the_run_and_the_version(checkout):
    root, env, _ = checkout
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    record = json.loads((root / "registry/record.json").read_text())
    client = MlflowClient()
    run = client.get_run(record["run_id"])
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    split_md5 = next(o["md5"] for o in lock["split"]["outs"] if o["path"] == "data/split")
    head = sh(root, "git", "rev-parse", "HEAD").strip()
    assert run.data.tags["git_commit"] == head
    assert run.data.tags["data_md5"] == split_md5
    assert run.data.params["train.lr"] == str(yaml.safe_load((root / "params.yaml").read_text())["train"]["lr"])
    assert "train.train_loss_final" in run.data.metrics and any(k.startswith("eval.") for k in run.data.metrics)
    assert len(client.get_metric_history(record["run_id"], "train.loss")) > 1
    version = client.get_model_version_by_alias(record["model_name"], record["alias"])
    assert int(version.version) == record["version"] and version.run_id == record["run_id"]


def test_an_experiment_reruns_only_what_its_param_reaches_and_shows_in_dvc_and_mlflow(checkout):
    """An eval param (not train's, which reran train..upload for minutes): the experiment reruns eval
    and what follows it, and only those, and shows as a DVC experiment and a second MLflow run."""
    root, env, _ = checkout
    before = yaml.safe_load((root / "params.yaml").read_text())["eval"]["max_new_tokens"]
    out = sh(root, ".venvs/core/bin/dvc", "exp", "run", "-S", "eval.max_new_tokens=48", env=env)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran[:2] == ["eval", "register"] and sorted(ran[2:]) == ["review", "upload"]  # both follow register
    exps = json.loads(sh(root, ".venvs/core/bin/dvc", "exp", "show", "--json", env=env))
    names = [e.get("name") for commit in exps for e in (commit.get("experiments") or [])
             for e in [e["revs"][0]] if e.get("name")]
    assert names, exps
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["tunepipe"])
    assert len(runs) == 2
    assert sorted(runs["params.eval.max_new_tokens"]) == sorted([str(before), "48"])
    assert set(runs["tags.dvc_exp_name"]) - {""}, "the experiment's run names its DVC experiment"


@pytest.mark.parametrize("family", ["llama3"])
def test_dvc_repro_with_a_non_chatml_base_model(tmp_path_factory, family):
    """The whole chain on a base model of another family, given as a local folder (base.source:
    hf): its chat template and stop token reach training, merge, lmdeploy's artifact and eval."""
    from families import FAMILIES, write_family_model

    model_dir = write_family_model(FAMILIES[family], tmp_path_factory.mktemp("hub") / family, hidden=128, heads=2)
    root, _, first = make_checkout(tmp_path_factory.mktemp("family"), {"base": {"source": "hf", "model_id": str(model_dir)}})
    for stage in ["base", "train", "merge", "turbomind", "eval", "register", "review", "upload"]:
        assert f"Running stage '{stage}'" in first
    from transformers import AutoTokenizer

    stop_id = AutoTokenizer.from_pretrained(root / "models/merged").convert_tokens_to_ids(FAMILIES[family].stop)
    for folder in ["models/merged", "models/turbomind"]:
        assert json.loads((root / folder / "generation_config.json").read_text())["eos_token_id"][0] == stop_id
    assert not (root / "models/turbomind/lmdeploy_chat_template.json").exists()  # ChatML's json only
    config = (root / "eval/opencompass_config.py").read_text()
    assert f"stop_words={[FAMILIES[family].stop]!r}" in config  # Llama-3: <|eot_id|> is also its eos
