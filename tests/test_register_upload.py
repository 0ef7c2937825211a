"""register and upload against a real (SQLite) MLflow store in a temporary folder."""
from __future__ import annotations

import json

import pytest

from conftest import copy_outputs, run_stage
from stages.common import StageError


@pytest.fixture
def registered(pipeline, workdir, monkeypatch):
    copy_outputs(pipeline, workdir, "models/merged", "metrics", "plots")
    (workdir / "metrics/eval.json").write_text(json.dumps({"demo_qa": {"base": {"rouge_l": 0.1}, "merged": {"rouge_l": 0.6}}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    run_stage(workdir, "register", "--lock", "missing.lock")
    return workdir


def test_register_logs_a_complete_run_and_a_version(registered):
    import mlflow
    from mlflow import MlflowClient

    record = json.loads((registered / "registry/record.json").read_text())
    client = MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.data.params["train.lora.r"] == "16" and run.data.params["split.seed"] == "42"
    assert run.data.metrics["eval.demo_qa.merged.rouge_l"] == 0.6
    assert run.data.metrics["clean.rejected_by_reason.duplicate"] == 3
    assert len(client.get_metric_history(record["run_id"], "train.loss")) == run.data.metrics["train.steps"]
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "plots")}
    assert "plots/train_loss.png" in artifacts and "plots/train_loss.csv" in artifacts
    version = client.get_model_version_by_alias("tunepipe-demo", "candidate")
    assert int(version.version) == record["version"] and version.run_id == record["run_id"]
    assert version.tags["eval.demo_qa.merged.rouge_l"] == "0.6"
    assert mlflow.get_tracking_uri().endswith("mlflow.db")


def test_a_second_registration_moves_the_alias(registered):
    from mlflow import MlflowClient

    run_stage(registered, "register", "--lock", "missing.lock")
    record = json.loads((registered / "registry/record.json").read_text())
    assert record["version"] == 2
    assert int(MlflowClient().get_model_version_by_alias("tunepipe-demo", "candidate").version) == 2


def test_upload_copies_the_registered_model_with_a_card(registered):
    run_stage(registered, "upload")
    receipt = json.loads((registered / "upload/receipt.json").read_text())
    dest = registered / receipt["destination"]
    assert dest == registered / "dist/models/tunepipe-demo/v1"
    assert (dest / "model" / "model.safetensors").exists() and "model/model.safetensors" in receipt["files"]
    card = (dest / "README.md").read_text()
    assert json.loads((registered / "registry/record.json").read_text())["run_id"] in card


def test_upload_refuses_an_unregistered_version(registered):
    record_path = registered / "registry/record.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "version": 99, "model_uri": "models:/tunepipe-demo/99"}))
    with pytest.raises(StageError, match="not registered"):
        run_stage(registered, "upload")
    assert not (registered / "dist/models/tunepipe-demo/v99").exists()
