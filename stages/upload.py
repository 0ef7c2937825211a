"""upload: publish a registered model version, and only a registered one.

Looks the version up in the MLflow registry (refusing if it is not there or belongs to another
run), and publishes one folder that transformers loads (AutoModelForCausalLM.from_pretrained):
the merged model's files at the top, the LoRA adapter in adapter/, and a model card naming the
base, data, params, commit, hashes and scores. Where the merged weights come from depends on
what register logged (the version's MLmodel metadata, tunepipe.log_weights):

- adapter: the version holds the adapter and a reference to its base, not the merged weights, so
  they come from the DVC-tracked models/merged. Its md5 in dvc.lock, and the md5 of the files
  themselves (computed as DVC does), must equal the version's model_md5 tag; otherwise upload
  refuses (`dvc checkout models/merged` at the version's commit restores the registered weights).
- merged: exactly the registered artifacts (the merged folder MLflow holds).

Versions registered before (transformers flavour, no tunepipe metadata) are published as their
registered files. The destination is upload.target: a local folder (default) or hf://owner/repo
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

from stages.common import Params, StageError, atomic_path, load_params, redact_uri, run_stage, write_json
from stages.dvc_hashes import dvc_md5, lock_hashes


class UploadParams(Params):
    target: str = "dist/models"     # a folder, or hf://owner/repo
    private: bool = True            # hf:// targets: create the repo private


def base_line(base: dict | None) -> str:
    if not base:
        return "not recorded"
    if base.get("source") == "hf" and base.get("revision"):
        where = f"`{base['model_id']}` at commit `{base['revision']}`"
    elif base.get("source") == "hf":
        where = f"local folder `{base.get('path') or base.get('model_id')}`"
    else:
        where = f"the pipeline's demo model (`{base.get('path')}`)"
    return f"{where}; manifest sha256 `{base.get('manifest_sha256', '')}`, dvc md5 `{base.get('dvc_md5') or 'n/a'}`"


def model_card(record: dict, version, log_weights: str) -> str:
    tags = "\n".join(f"| {k} | {v} |" for k, v in sorted(version.tags.items()))
    registered = {"adapter": "the LoRA adapter and a reference to its base (the merged weights below are "
                             "models/merged, checked against the version's md5)",
                  "merged": "the merged model's files"}.get(log_weights, "the registered MLflow model's files")
    return (f"# {record['model_name']} v{record['version']}\n\n"
            f"LoRA fine-tune merged into its base, trained and evaluated by tunepipe (DVC + MLflow). "
            f"`AutoModelForCausalLM.from_pretrained` loads this folder; `adapter/` is the LoRA adapter alone.\n\n"
            f"- MLflow run: `{record['run_id']}` (experiment `{record['experiment']}`)\n"
            f"- registered as `{record['model_uri']}`, alias `@{record['alias']}`: {registered}\n"
            f"- base: {base_line(record.get('base'))}\n"
            f"- git commit: `{record['git_commit']}`\n- data (dvc md5 of data/split): `{record['data_md5']}`\n"
            f"- merged weights (dvc md5): `{record['model_md5']}`\n\n"
            f"Reproduce: `git checkout {record['git_commit']} && dvc pull && dvc repro`\n\n"
            f"| version tag | value |\n|---|---|\n{tags}\n")


def verified_merged(merged: str, lock: str, version, uri: str, registered: dict) -> Path:
    """models/merged, if it holds the weights the version was registered with; else refuse."""
    key = Path(merged).as_posix()
    expected = version.tags.get("model_md5", "")
    if not expected:
        raise StageError(f"{uri} was registered without dvc.lock's md5 of {key}: which merged weights belong to it "
                         f"cannot be checked, refusing (register it from `dvc repro`, or with register.log_weights: merged)")
    if registered.get(key, expected) != expected:
        raise StageError(f"{uri}: tag model_md5 {expected} differs from the md5 in its MLmodel ({registered[key]}): refusing")
    restore = f"check out the version's commit ({version.tags.get('git_commit', '?')}) and run `dvc checkout {key}`"
    locked = lock_hashes(lock).get(key, "")
    if locked and locked != expected:
        raise StageError(f"{lock} records {key} md5 {locked}, but {uri} was registered with {expected}: "
                         f"refusing to publish other weights; {restore}")
    if not Path(merged, "config.json").exists():
        raise StageError(f"{merged}: no merged model to publish for {uri}: {restore} (or `dvc pull {key}`)")
    actual = dvc_md5(merged)
    if actual != expected:
        raise StageError(f"{merged} has md5 {actual}, but {uri} was registered with {expected}: "
                         f"refusing to publish other weights; {restore}")
    return Path(merged)


def assemble(out: Path, files: Path, weights: Path | None, card: str) -> None:
    """The published folder: the merged model's files, adapter/, README.md (the model card)."""
    if weights is None:  # a version registered before tunepipe metadata: its files as registered
        shutil.copytree(files, out, dirs_exist_ok=True)
    else:
        shutil.copytree(weights, out, dirs_exist_ok=True)
        if (files / "artifacts" / "adapter").is_dir():
            shutil.copytree(files / "artifacts" / "adapter", out / "adapter", dirs_exist_ok=True)
    (out / "README.md").write_text(card, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", default="registry/record.json")
    ap.add_argument("--receipt", default="upload/receipt.json")
    ap.add_argument("--merged", default="models/merged", help="DVC-tracked merged model (adapter-registered versions)")
    ap.add_argument("--lock", default="dvc.lock")
    args = ap.parse_args()
    p = load_params("upload", UploadParams)
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if not p.target.startswith("hf://") else None

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if not Path(args.record).exists():
        raise StageError(f"{args.record}: no registry record (run the register stage first)")
    record = json.loads(Path(args.record).read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record.get("tracking_uri") or "sqlite:///mlflow.db"))
    try:
        version = MlflowClient().get_model_version(record["model_name"], str(record["version"]))
    except MlflowException:
        raise StageError(f"{record['model_name']} version {record['version']} is not registered in "
                         f"{redact_uri(mlflow.get_tracking_uri())}: refusing to upload an unregistered model") from None
    if version.run_id != record["run_id"]:
        raise StageError(f"{record['model_uri']} belongs to run {version.run_id}, not {record['run_id']}: refusing")

    with tempfile.TemporaryDirectory() as staging:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=record["model_uri"], dst_path=staging))
        info = (Model.load(str(files / "MLmodel")).metadata or {}).get("tunepipe", {})
        log_weights = info.get("log_weights", "")
        if log_weights == "adapter":
            weights = verified_merged(args.merged, args.lock, version, record["model_uri"], info.get("dvc_md5", {}))
        elif log_weights == "merged":
            weights = files / "artifacts" / "merged"
        else:
            weights = None
        card = model_card(record, version, log_weights)
        if p.target.startswith("hf://"):
            from huggingface_hub import HfApi

            folder = Path(staging) / "publish"
            assemble(folder, files, weights, card)
            digests = sha256_digests(folder)
            repo_id = p.target.removeprefix("hf://")
            api = HfApi(token=os.environ.get("HF_TOKEN"))
            api.create_repo(repo_id, private=p.private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                       commit_message=f"{record['model_uri']} (run {record['run_id']})")
            destination = commit.commit_url
        else:
            dest = Path(p.target) / record["model_name"] / f"v{record['version']}"
            with atomic_path(dest, is_dir=True) as tmp:
                assemble(tmp, files, weights, card)
                digests = sha256_digests(tmp)
            destination = str(dest)
    write_json(args.receipt, {"model_uri": record["model_uri"], "run_id": record["run_id"], "log_weights": log_weights,
                              "destination": destination, "files": digests})
    print(f"upload: {record['model_uri']} ({log_weights or 'as registered'}) -> {destination} ({len(digests)} files)")


def sha256_digests(folder: Path) -> dict:
    digests = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            digest = hashlib.sha256()
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
            digests[f.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests

if __name__ == "__main__":
    run_stage(main)
