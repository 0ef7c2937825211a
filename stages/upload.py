"""upload: publish the registered model version behind upload.alias (default champion), and no other.

Looks up the version the alias points at in the MLflow registry (the model is the one register's
record names); `--version N` is refused unless the alias points at N, and a version that is not
registered is refused. When no version is behind the alias yet (the first version failed the gate)
or the version behind it was already uploaded to upload.target (a version tag says where), there
is nothing to do: the receipt says so and the stage succeeds, so a `dvc exp run` whose version
failed the gate still completes. Otherwise it publishes one folder that transformers loads (AutoModelForCausalLM.from_pretrained):
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

from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json
from stages.dvc_hashes import dvc_md5, lock_hashes


class UploadParams(Params):
    alias: str = "champion"         # only the version behind this alias is published
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
            f"Reproduce: `git checkout {record['git_commit']} && dvc pull && dvc repro`, or check it with "
            f"`tunepipe reproduce {record['model_name']}/{record['version']}`\n\n"
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
    ap.add_argument("--version", type=int, default=None, help="this version; refused unless upload.alias points at it")
    args = ap.parse_args()
    p = load_params("upload", UploadParams)
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if not p.target.startswith("hf://") else None

    import mlflow
    from mlflow import MlflowClient

    if not Path(args.record).exists():
        raise StageError(f"{args.record}: no registry record (run the register stage first)")
    record = json.loads(Path(args.record).read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record.get("tracking_uri") or "sqlite:///mlflow.db"))
    client = MlflowClient()
    name = record["model_name"]
    version = version_behind_alias(client, name, p.alias, args.version)
    if version is None:
        return skip(args.receipt, p.alias, None, f"no version of {name} is @{p.alias} yet (register's gate promotes one)")
    model_uri = f"models:/{name}/{version.version}"
    if str(version.version) == str(record["version"]) and version.run_id != record["run_id"]:
        raise StageError(f"{model_uri} belongs to run {version.run_id}, not {record['run_id']}: refusing")
    done = version.tags.get("upload_destination", "")
    if version.tags.get("upload_target") == p.target and (p.target.startswith("hf://") or Path(done).is_dir()):
        return skip(args.receipt, p.alias, version, f"{model_uri} (@{p.alias}) is already uploaded to {done}", done)
    published = {"model_name": name, "version": version.version, "model_uri": model_uri, "alias": p.alias,
                 "run_id": version.run_id, "experiment": record.get("experiment", ""),
                 **{k: version.tags.get(k, "") for k in ("git_commit", "data_md5", "model_md5")}}
    destination, digests, log_weights = publish(args, p, version, published)
    client.set_model_version_tag(name, version.version, "upload_target", p.target)
    client.set_model_version_tag(name, version.version, "upload_destination", destination)
    write_json(args.receipt, {"model_uri": model_uri, "alias": p.alias, "run_id": version.run_id,
                              "log_weights": log_weights, "destination": destination, "files": digests})
    print(f"upload: {model_uri} (@{p.alias}, {log_weights or 'as registered'}) -> {destination} ({len(digests)} files)")


def version_behind_alias(client, name: str, alias: str, requested: int | None):
    """The version upload.alias points at (None if none does); an explicit other version is refused."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        behind = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        behind = None
    if requested is None:
        return behind
    try:
        client.get_model_version(name, str(requested))
    except MlflowException:
        raise StageError(f"{name} version {requested} is not registered in {mlflow.get_tracking_uri()}: "
                         f"refusing to upload an unregistered model") from None
    if behind is None or str(behind.version) != str(requested):
        holder = f"version {behind.version} is" if behind else "no version is"
        raise StageError(f"{name} version {requested} is not @{alias} ({holder}): upload publishes only the "
                         f"version behind upload.alias, refusing")
    return behind


def skip(receipt: str, alias: str, version, reason: str, destination: str = "") -> None:
    write_json(receipt, {"model_uri": f"models:/{version.name}/{version.version}" if version else "",
                         "alias": alias, "destination": destination, "skipped": reason})
    print(f"upload: nothing to do: {reason}")


def publish(args, p: UploadParams, version, published: dict) -> tuple[str, dict, str]:
    """Download the version, check or pick its merged weights, and publish the folder to upload.target."""
    import mlflow
    from mlflow.models import Model

    model_uri = published["model_uri"]
    with tempfile.TemporaryDirectory() as staging:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=staging))
        info = (Model.load(str(files / "MLmodel")).metadata or {}).get("tunepipe", {})
        log_weights = info.get("log_weights", "")
        if log_weights == "adapter":
            weights = verified_merged(args.merged, args.lock, version, model_uri, info.get("dvc_md5", {}))
        elif log_weights == "merged":
            weights = files / "artifacts" / "merged"
        else:
            weights = None
        card = model_card({**published, "base": info.get("base")}, version, log_weights)
        if p.target.startswith("hf://"):
            from huggingface_hub import HfApi

            folder = Path(staging) / "publish"
            assemble(folder, files, weights, card)
            digests = sha256_digests(folder)
            repo_id = p.target.removeprefix("hf://")
            api = HfApi(token=os.environ.get("HF_TOKEN"))
            api.create_repo(repo_id, private=p.private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                       commit_message=f"{model_uri} (run {version.run_id})")
            destination = commit.commit_url
        else:
            dest = Path(p.target) / published["model_name"] / f"v{version.version}"
            with atomic_path(dest, is_dir=True) as tmp:
                assemble(tmp, files, weights, card)
                digests = sha256_digests(tmp)
            destination = str(dest)
    return destination, digests, log_weights


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
