"""register and upload against a real (SQLite) MLflow store in a temporary folder.

The fixture writes the dvc.lock that `dvc repro` would (md5s computed by DVC's own dvc_data);
models/turbomind is not built here (it needs lmdeploy's environment), so its lock entry is a
stand-in md5 that register must carry through unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_outputs, run_stage, write_params
from stages.common import StageError
from stages.dvc_hashes import dvc_md5

TURBOMIND_MD5 = "7f3c0d1e2b4a59687766554433221100.dir"
LOCKED = {"split": "data/split", "cpt": "models/sft_base", "dpo": "models/dpo_adapter", "merge": "models/merged"}


def dvc_data_md5(path: Path) -> str:
    """The md5 DVC itself computes for a file or folder (what `dvc repro` writes to dvc.lock)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as odb:
        _, _, obj = build(HashFileDB(fs, odb), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def write_lock(folder: Path) -> dict:
    stages = {stage: {"outs": [{"path": out, "hash": "md5", "md5": dvc_data_md5(folder / out)}]}
              for stage, out in LOCKED.items()}
    stages["turbomind"] = {"outs": [{"path": "models/turbomind", "hash": "md5", "md5": TURBOMIND_MD5}]}
    (folder / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage["outs"]}


def prepare(pipeline: Path, workdir: Path, monkeypatch) -> Path:
    copy_outputs(pipeline, workdir, "data/split", "models/sft_base", "models/dpo_adapter", "models/merged", "metrics", "plots")
    (workdir / "metrics/eval.json").write_text(json.dumps({"demo_qa": {"base": {"rougeL": 10.0}, "merged": {"rougeL": 60.0}}}))
    write_lock(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    return workdir


@pytest.fixture
def registered(pipeline, workdir, monkeypatch):
    """A store with version 1, for tests that change it or the files."""
    prepare(pipeline, workdir, monkeypatch)
    run_stage(workdir, "register")
    return workdir


@pytest.fixture(scope="module")
def registered_once(pipeline, tmp_path_factory):
    """A store with version 1 shared by the tests that only read it (one SQLite store setup fewer each)."""
    folder = tmp_path_factory.mktemp("registered")
    write_params(folder)
    with pytest.MonkeyPatch.context() as mp:
        prepare(pipeline, folder, mp)
        run_stage(folder, "register")
    return folder


@pytest.fixture
def shared(registered_once, monkeypatch):
    import mlflow

    uri = f"sqlite:///{registered_once}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # another test's stage may have set it to its own store
    return registered_once


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def artifact_store_bytes() -> int:
    """Bytes under the experiment's artifact location: every run's and logged model's files."""
    from mlflow import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    return folder_bytes(Path(local_file_uri_to_path(MlflowClient().get_experiment_by_name("tunepipe").artifact_location)))


def same_weights(a: Path, b: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    left, right = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b))
    assert left.keys() == right.keys()
    assert all(left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left)


def test_dvc_md5_is_dvcs_own(pipeline):
    for rel in ["models/dpo_adapter", "models/merged", "data/split", "models/sft_base/manifest.json"]:
        assert dvc_md5(pipeline / rel) == dvc_data_md5(pipeline / rel)


def test_register_logs_a_complete_run_and_a_version(shared):
    import mlflow
    from mlflow import MlflowClient

    record = json.loads((shared / "registry/record.json").read_text())
    client = MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.data.params["train.lora.r"] == "16" and run.data.params["split.seed"] == "42"
    assert run.data.metrics["eval.demo_qa.merged.rougeL"] == 60.0
    assert run.data.metrics["clean.rejected_by_reason.duplicate"] == 3
    assert len(client.get_metric_history(record["run_id"], "train.loss")) == run.data.metrics["train.steps"]
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "plots")}
    assert "plots/train_loss.png" in artifacts and "plots/train_loss.csv" in artifacts
    version = client.get_model_version_by_alias("tunepipe-demo", "candidate")
    assert int(version.version) == record["version"] and version.run_id == record["run_id"]
    assert version.tags["eval.demo_qa.merged.rougeL"] == "60.0" and version.tags["gate.decision"] == "pass"
    assert int(client.get_model_version_by_alias("tunepipe-demo", "champion").version) == record["version"]
    assert mlflow.get_tracking_uri().endswith("mlflow.db")


def register_without_torch(folder: Path) -> None:
    """Run register in a fresh interpreter and fail if it imported torch (so it loaded no weights)."""
    code = ("import sys; sys.argv = ['register']; from stages import common, register; common.run_stage(register.main); "
            "assert 'torch' not in sys.modules, 'register imported torch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]


def test_each_version_stores_about_the_adapter_and_register_loads_no_model(registered, capsys):
    from mlflow import MlflowClient

    adapter = folder_bytes(registered / "models/dpo_adapter")
    merged_weights = (registered / "models/merged/model.safetensors").stat().st_size
    first = artifact_store_bytes()  # the store was empty before the first registration
    register_without_torch(registered)
    second = artifact_store_bytes() - first
    with capsys.disabled():
        print(f"\nartifact store per version, log_weights=adapter: {first} and {second} bytes "
              f"(adapter folder {adapter}, merged weights {merged_weights})")
    for growth in (first, second):
        assert growth < 2 * adapter and growth < merged_weights / 3
    record = json.loads((registered / "registry/record.json").read_text())
    assert record["version"] == 2
    assert int(MlflowClient().get_model_version_by_alias("tunepipe-demo", "candidate").version) == 2


def test_the_version_names_its_base_and_the_dvc_hashes(shared):
    import mlflow
    from mlflow import MlflowClient

    lock = write_lock(shared)  # same files, same md5s as the lock register read
    manifest_sha = hashlib.sha256((shared / "models/sft_base/manifest.json").read_bytes()).hexdigest()
    expected = {"log_weights": "adapter", "base_source": "demo", "base_model_id": "", "base_revision": "",
                "base_path": str((shared / "models/sft_base").resolve()), "base_manifest_sha256": manifest_sha,
                "base_md5": lock["models/sft_base"], "adapter_md5": lock["models/dpo_adapter"],
                "model_md5": lock["models/merged"], "turbomind_md5": TURBOMIND_MD5}
    version = MlflowClient().get_model_version("tunepipe-demo", "1")
    assert {k: version.tags.get(k) for k in expected} == expected
    meta = mlflow.models.get_model_info("models:/tunepipe-demo/1").metadata["tunepipe"]
    assert meta["log_weights"] == "adapter"
    assert meta["base"]["manifest_sha256"] == manifest_sha and meta["base"]["dvc_md5"] == lock["models/sft_base"]
    assert meta["dvc_md5"] == {**lock, "models/turbomind": TURBOMIND_MD5}
    (shared / "dl").mkdir()
    files = Path(mlflow.artifacts.download_artifacts("models:/tunepipe-demo/1", dst_path=str(shared / "dl")))
    weights = {f.relative_to(files).as_posix() for f in files.rglob("*.safetensors")}
    assert weights == {"artifacts/adapter/adapter_model.safetensors"}


def test_pyfunc_loads_the_adapter_onto_its_base(shared):
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    loaded = mlflow.pyfunc.load_model("models:/tunepipe-demo/1")
    replies = loaded.predict(["What is aspirin used for?"])
    assert isinstance(replies, list) and len(replies) == 1 and isinstance(replies[0], str)
    inner = loaded.unwrap_python_model()
    assert type(inner.model).__name__ == "PeftModelForCausalLM"
    merged = AutoModelForCausalLM.from_pretrained(shared / "models/merged")
    batch = inner.tokenizer(["<|im_start|>user\nWhat is aspirin?<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        assert (inner.model(**batch).logits - merged(**batch).logits).abs().max() < 1e-3


def test_upload_publishes_models_merged_with_the_adapter_and_a_card(shared):
    run_stage(shared, "upload")
    receipt = json.loads((shared / "upload/receipt.json").read_text())
    dest = shared / receipt["destination"]
    assert dest == shared / "dist/models/tunepipe-demo/v1" and receipt["log_weights"] == "adapter"
    same_weights(dest, shared / "models/merged")
    assert (dest / "adapter/adapter_model.safetensors").read_bytes() == \
        (shared / "models/dpo_adapter/adapter_model.safetensors").read_bytes()
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "README.md"} <= set(receipt["files"])
    card = (dest / "README.md").read_text()
    record = json.loads((shared / "registry/record.json").read_text())
    assert record["run_id"] in card and record["model_md5"] in card and record["base"]["manifest_sha256"] in card


@pytest.mark.parametrize("change", ["weights", "lock", "missing"])
def test_upload_refuses_merged_weights_other_than_the_registered_ones(registered, change):
    merged = registered / "models/merged"
    if change == "weights":  # the folder changed after registration, dvc.lock did not
        from safetensors.torch import load_file, save_file

        tensors = load_file(merged / "model.safetensors")
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 1e-3
        save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
        match = "has md5 .* registered with"
    elif change == "lock":  # a later merge recorded other weights
        lock = yaml.safe_load((registered / "dvc.lock").read_text())
        lock["stages"]["merge"]["outs"][0]["md5"] = "0" * 32 + ".dir"
        (registered / "dvc.lock").write_text(yaml.safe_dump(lock))
        match = "dvc.lock records models/merged md5 0{32}"
    else:
        shutil.rmtree(merged)
        match = "no merged model to publish"
    with pytest.raises(StageError, match=match):
        run_stage(registered, "upload")
    assert not (registered / "dist/models/tunepipe-demo/v1").exists()
    assert not (registered / "upload/receipt.json").exists()


def test_log_weights_merged_registers_and_uploads_the_merged_files(pipeline, workdir, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    write_params(workdir, {"register": {"log_weights": "merged"}})
    prepare(pipeline, workdir, monkeypatch)
    register_without_torch(workdir)  # the merged files are copied as they are, never loaded
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    merged_weights = (workdir / "models/merged/model.safetensors").stat().st_size
    growth = artifact_store_bytes()
    with capsys.disabled():
        print(f"\nartifact store per version, log_weights=merged: {growth} bytes (merged weights {merged_weights})")
    assert growth > merged_weights
    version = MlflowClient().get_model_version("tunepipe-demo", "1")
    assert version.tags["log_weights"] == "merged" and version.tags["model_md5"] == dvc_data_md5(workdir / "models/merged")
    shutil.rmtree(workdir / "models/merged")  # upload publishes what MLflow holds, not the workspace
    run_stage(workdir, "upload")
    dest = workdir / json.loads((workdir / "upload/receipt.json").read_text())["destination"]
    same_weights(dest, pipeline / "models/merged")
    assert (dest / "adapter/adapter_config.json").exists() and (dest / "README.md").exists()


def test_upload_refuses_an_unregistered_version(shared):
    with pytest.raises(StageError, match="tunepipe-demo version 99 is not registered in .*: refusing"):
        run_stage(shared, "upload", "--version", "99", "--receipt", "upload/receipt99.json")
    assert not (shared / "dist/models/tunepipe-demo/v99").exists()
