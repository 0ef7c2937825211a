"""upload: publish a registered model version, and only a registered one.

Looks the version up in the MLflow registry (refusing if it is not there or belongs to another
run), downloads exactly the registered artifacts, adds a model card naming the data, params,
commit and scores, and copies it all to upload.target: a local folder (default) or hf://owner/repo
(Hugging Face Hub; the token comes from HF_TOKEN in the environment, never from params).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json


class UploadParams(Params):
    target: str = "dist/models"     # a folder, or hf://owner/repo
    private: bool = True            # hf:// targets: create the repo private


def model_card(record: dict, version) -> str:
    tags = "\n".join(f"| {k} | {v} |" for k, v in sorted(version.tags.items()))
    return (f"# {record['model_name']} v{record['version']}\n\n"
            f"LoRA fine-tune merged into its base, trained and evaluated by tunepipe (DVC + MLflow).\n\n"
            f"- MLflow run: `{record['run_id']}` (experiment `{record['experiment']}`)\n"
            f"- registered as `{record['model_uri']}`, alias `@{record['alias']}`\n"
            f"- git commit: `{record['git_commit']}`\n- data (dvc md5 of data/split): `{record['data_md5']}`\n"
            f"- merged weights (dvc md5): `{record['model_md5']}`\n\n"
            f"Reproduce: `git checkout {record['git_commit']} && dvc pull && dvc repro`\n\n"
            f"| version tag | value |\n|---|---|\n{tags}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", default="registry/record.json")
    ap.add_argument("--receipt", default="upload/receipt.json")
    args = ap.parse_args()
    p = load_params("upload", UploadParams)
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if not p.target.startswith("hf://") else None

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not Path(args.record).exists():
        raise StageError(f"{args.record}: no registry record (run the register stage first)")
    record = json.loads(Path(args.record).read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record.get("tracking_uri") or "sqlite:///mlflow.db"))
    try:
        version = MlflowClient().get_model_version(record["model_name"], str(record["version"]))
    except MlflowException:
        raise StageError(f"{record['model_name']} version {record['version']} is not registered in "
                         f"{mlflow.get_tracking_uri()}: refusing to upload an unregistered model") from None
    if version.run_id != record["run_id"]:
        raise StageError(f"{record['model_uri']} belongs to run {version.run_id}, not {record['run_id']}: refusing")

    with tempfile.TemporaryDirectory() as staging:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=record["model_uri"], dst_path=staging))
        (files / "README.md").write_text(model_card(record, version), encoding="utf-8")
        digests = {str(f.relative_to(files)): hashlib.sha256(f.read_bytes()).hexdigest()
                   for f in sorted(files.rglob("*")) if f.is_file()}
        if p.target.startswith("hf://"):
            from huggingface_hub import HfApi

            repo_id = p.target.removeprefix("hf://")
            api = HfApi(token=os.environ.get("HF_TOKEN"))
            api.create_repo(repo_id, private=p.private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(files),
                                       commit_message=f"{record['model_uri']} (run {record['run_id']})")
            destination = commit.commit_url
        else:
            dest = Path(p.target) / record["model_name"] / f"v{record['version']}"
            with atomic_path(dest, is_dir=True) as tmp:
                shutil.copytree(files, tmp, dirs_exist_ok=True)
            destination = str(dest)
    write_json(args.receipt, {"model_uri": record["model_uri"], "run_id": record["run_id"],
                              "destination": destination, "files": digests})
    print(f"upload: {record['model_uri']} -> {destination} ({len(digests)} files)")


if __name__ == "__main__":
    run_stage(main)
