"""register: log one complete MLflow run for this experiment and register its model version.

DVC skips stages whose deps did not change, so no single process sees every stage run. This
stage reads what they left behind instead: params.yaml (flattened), every metrics file, the loss
curve, dvc.lock's hashes of the data and the models, and the git commit. Then it logs the model,
registers it as a new version of the registered model, points the alias at it and tags the
version with the eval scores. Tracking store: MLFLOW_TRACKING_URI if set, else register.tracking_uri.

What is logged as the model (register.log_weights):
- adapter (default): the PEFT adapter (models/adapter, megabytes) and a reference to the base
  (source, Hugging Face id and resolved commit or local folder, sha256 of models/base/manifest.json,
  dvc.lock's md5 of models/base), with dvc.lock's md5 of models/adapter, models/merged and
  models/turbomind. The weights of base and merged model stay where they are (Hugging Face cache,
  models/, DVC cache): an experiment adds about the adapter's size to the MLflow artifact store,
  not a third full copy of the model. upload publishes models/merged after checking its md5.
- merged: the merged model's files as they are on disk (and the adapter), as before.
Every folder logged is hashed here as DVC does and must match its md5 in dvc.lock (for merged,
that reads the merged weights once), so the version's hashes name what it holds.

Mechanism: mlflow.pyfunc.log_model(python_model=stages/registered_model.py, artifacts={adapter or
merged folder}, model_config={where the base is}, metadata={"tunepipe": base reference and hashes}).
pyfunc copies the artifact folders file by file and loads nothing here (no input_example and explicit
pip_requirements, so MLflow neither runs the model nor infers its requirements by loading it);
mlflow.pyfunc.load_model(version) later loads base + adapter with peft where the base is reachable.
MLflow's transformers flavour does reference a base for PEFT models (hub id, or base_model_path), but
only given the PeftModel in memory: logging would load the full base weights on this CPU, which
this stage must not do, and for a base that is not a hub id it saves the base weights after all.
The reference and hashes are also version tags (base_*, adapter_md5, model_md5 = models/merged,
turbomind_md5, log_weights) so the registry UI and MlflowClient searches show them.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from stages.common import Params, StageError, load_params, read_jsonl, redact_uri, resolve_base, run_stage, write_json
from stages.dvc_hashes import dvc_md5, lock_hashes
from stages.promotion import GateParams, Outcome, decide, eval_scores, gate_tags, summary, tag_scores

MODEL_CODE = Path(__file__).with_name("registered_model.py")  # the pyfunc model, logged as code


class RegisterParams(Params):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tunepipe"
    model_name: str = "tunepipe-demo"
    alias: str = "candidate"         # moved to each new version
    champion_alias: str = "champion"  # moved to a new version only when it passes the gate
    gate: GateParams = GateParams()   # stages/promotion.py
    sample_generations: int = 5
    log_weights: Literal["adapter", "merged"] = "adapter"  # adapter (+ base reference) | merged (full copy)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics-dir", default="metrics")
    ap.add_argument("--plots-dir", default="plots")
    ap.add_argument("--merged", default="models/merged")
    ap.add_argument("--adapter", default="models/dpo_adapter")
    ap.add_argument("--base", default="models/sft_base")
    ap.add_argument("--turbomind", default="models/turbomind", help="only its md5 in dvc.lock is read")
    ap.add_argument("--predictions", default="eval/predictions.jsonl")
    ap.add_argument("--lock", default="dvc.lock")
    ap.add_argument("--out", default="registry/record.json")
    args = ap.parse_args()
    p = load_params("register", RegisterParams)

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", p.tracking_uri)
    facts = gather(args, p)
    try:
        record = register_once(args, p, tracking_uri, facts)
    except (MlflowException, RequestException) as e:
        raise StageError(f"MLflow tracking server {redact_uri(tracking_uri)} failed during registration "
                         f"({scrubbed(first_line(e), tracking_uri)}): no version was completed; rerun register when "
                         f"it answers (an interrupted registration is completed, not duplicated)") from None
    write_json(args.out, record)
    print(f"register: {record['gate_summary']}")
    print(f"register: run {record['run_id']}, {p.model_name} version {record['version']} @{p.alias}"
          f"{' @' + p.champion_alias if record['gate'] == 'pass' else ''} "
          f"({p.log_weights} logged; {redact_uri(tracking_uri)})")


def gather(args, p: RegisterParams) -> dict:
    """Everything the run and version record, read from the files the other stages left (no MLflow)."""
    all_params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    metrics = {}
    for path in sorted(Path(args.metrics_dir).glob("*.json")):
        flat = flatten(json.loads(path.read_text()), path.stem + ".")
        metrics.update({k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    eval_path = Path(args.metrics_dir) / "eval.json"
    scores = eval_scores(json.loads(eval_path.read_text())) if eval_path.exists() else []
    hashes = lock_hashes(Path(args.lock))
    reference = model_reference(args, p.log_weights, hashes)
    ref_tags = reference_tags(reference)
    if p.log_weights == "adapter" and not ref_tags["model_md5"]:
        print(f"register: warning: {args.lock} records no md5 of {args.merged}: upload cannot verify the merged "
              f"weights of this version and will refuse it")
    tags = {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "data_md5": hashes.get("data/split", ""), "train_backend": all_params["train"]["backend"], **ref_tags,
            **{f"dvc_lock.{path}": md5 for path, md5 in hashes.items()}}
    # the same inputs give the same key: a rerun after a failure finds its unfinished version by it
    key = hashlib.sha256(json.dumps([flatten(all_params), metrics, tags], sort_keys=True, default=str).encode()).hexdigest()[:32]
    return {"all_params": all_params, "metrics": metrics, "scores": scores, "reference": reference,
            "ref_tags": ref_tags, "tags": {**tags, "registration_key": key}, "key": key}


def register_once(args, p: RegisterParams, tracking_uri: str, facts: dict) -> dict:
    """Log the run and register the version, or complete the version an interrupted attempt left.
    The version is created with all its tags (gate included) in one call; the aliases follow, and the
    tag registration=complete last, so a version without it is one to complete, never to copy."""
    import mlflow
    from mlflow import MlflowClient

    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    version = unfinished_version(client, p.model_name, facts["key"])
    if version is None:
        champion = current_champion(client, p.model_name, p.champion_alias)
        passed, outcomes = decide(facts["scores"], tag_scores(champion.tags) if champion else None, p.gate)
        before = str(champion.version) if champion else None
        gate = gate_tags(passed, outcomes, before)
        mlflow.set_experiment(p.experiment)
        version = log_and_register(mlflow, args, p, facts, gate)
    else:
        print(f"register: completing version {version.version}, left unfinished by an interrupted registration")
    passed = version.tags.get("gate.decision") == "pass"
    client.set_registered_model_alias(p.model_name, p.alias, version.version)
    if passed:
        client.set_registered_model_alias(p.model_name, p.champion_alias, version.version)
    client.set_model_version_tag(p.model_name, version.version, "registration", "complete")
    champion = current_champion(client, p.model_name, p.champion_alias)
    ref, tags = facts["reference"], version.tags
    outcomes = [Outcome(k.removeprefix("gate."), *v.split(": ", 1)) for k, v in sorted(tags.items())
                if k.startswith("gate.") and k not in ("gate.decision", "gate.champion_before")]
    before = tags.get("gate.champion_before")
    return {"run_id": version.run_id, "experiment": p.experiment, "tracking_uri": redact_uri(tracking_uri),
            "model_name": p.model_name, "version": int(version.version), "alias": p.alias,
            "model_uri": f"models:/{p.model_name}/{version.version}", "gate": "pass" if passed else "fail",
            "gate_summary": summary(passed, outcomes, None if before in (None, "none") else before),
            "champion": int(champion.version) if champion else None,
            "git_commit": tags.get("git_commit", ""), "data_md5": tags.get("data_md5", ""),
            "model_md5": facts["ref_tags"]["model_md5"], "log_weights": p.log_weights, "base": ref["base"],
            "dvc_md5": ref["dvc_md5"]}


def log_and_register(mlflow, args, p: RegisterParams, facts: dict, gate: dict):
    """One complete MLflow run, then the model version with every tag it will carry."""
    tags = facts["tags"]
    run_name = os.environ.get("DVC_EXP_NAME") or f"{facts['all_params']['train']['backend']}-{tags['git_commit'][:8]}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                           for k, v in flatten(facts["all_params"]).items()})
        mlflow.log_metrics(facts["metrics"])
        mlflow.set_tags({**tags, **gate})
        log_curves_and_plots(mlflow, Path(args.plots_dir))
        for extra in ["params.yaml", args.lock, args.predictions]:
            if Path(extra).exists():
                mlflow.log_artifact(extra)
        mlflow.log_artifacts(args.metrics_dir, "metrics")
        log_sample_generations(mlflow, Path(args.predictions), p.sample_generations)
        model_info = log_model(mlflow, args, facts["reference"])
        version_tags = {"git_commit": tags["git_commit"], "data_md5": tags["data_md5"], "run_id": run.info.run_id,
                        "registration_key": facts["key"], **facts["ref_tags"], **gate,
                        **{k: v for k, v in tags.items() if k.startswith("dvc_lock.")},
                        **{k: str(v) for k, v in facts["metrics"].items() if k.startswith("eval.")}}
        return mlflow.register_model(model_info.model_uri, p.model_name, tags=version_tags)


def unfinished_version(client, model_name: str, key: str):
    """The version an interrupted registration of these same inputs created, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in versions:
        if version.tags.get("registration_key") == key and version.tags.get("registration") != "complete":
            return client.get_model_version(model_name, version.version)
    return None


def current_champion(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def check_reachable(tracking_uri: str) -> None:
    """A tracking server that does not answer fails here at once, not after MLflow's retries."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except RequestException as e:
        raise StageError(f"MLflow tracking server {redact_uri(tracking_uri)} is unreachable "
                         f"({scrubbed(first_line(e), tracking_uri)}): nothing was registered") from None


def scrubbed(text: str, uri: str) -> str:
    password = urlsplit(uri).password
    return text.replace(password, "***") if password else text


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def model_reference(args, log_weights: str, hashes: dict) -> dict:
    """What the version is: the base it applies to, and DVC's md5 of every model folder. The folders
    logged as artifacts are hashed here and must match dvc.lock, so the hashes name what was logged."""
    manifest_path = Path(args.base) / "manifest.json"
    if not manifest_path.exists():
        raise StageError(f"{manifest_path}: no base manifest (run the base stage)")
    if not Path(args.adapter, "adapter_config.json").exists():
        raise StageError(f"{args.adapter}: no adapter_config.json (run the train stage)")
    if log_weights == "merged" and not Path(args.merged, "config.json").exists():
        raise StageError(f"{args.merged}: no merged model (run the merge stage)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    location, load = resolve_base(args.base)
    local = Path(location)
    base = {"source": manifest["source"], "model_id": manifest.get("model_id") or "",
            "revision": load["revision"] or "", "path": str(local.resolve()) if local.is_dir() else "",
            "trust_remote_code": load["trust_remote_code"],
            "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
            "dvc_md5": hashes.get(Path(args.base).as_posix(), "")}
    dvc = {key: hashes.get(key, "") for key in
           [Path(args.base).as_posix(), Path(args.adapter).as_posix(), Path(args.merged).as_posix(),
            Path(args.turbomind).as_posix(), "data/split"]}
    logged = [args.adapter] + ([args.merged] if log_weights == "merged" else [])
    for folder in logged:
        key, md5 = Path(folder).as_posix(), dvc_md5(folder)
        if dvc[key] and dvc[key] != md5:
            raise StageError(f"{folder} (md5 {md5}) is not what {args.lock} records ({dvc[key]}): "
                             f"run `dvc checkout {key}` or `dvc repro` first")
        dvc[key] = md5
    return {"log_weights": log_weights, "base": base, "dvc_md5": dvc,
            "adapter": Path(args.adapter).as_posix(), "merged": Path(args.merged).as_posix(),
            "turbomind": Path(args.turbomind).as_posix()}


def reference_tags(reference: dict) -> dict:
    base, dvc = reference["base"], reference["dvc_md5"]
    return {"log_weights": reference["log_weights"], "base_source": base["source"], "base_model_id": base["model_id"],
            "base_revision": base["revision"], "base_path": base["path"], "base_manifest_sha256": base["manifest_sha256"],
            "base_md5": base["dvc_md5"], "adapter_md5": dvc[reference["adapter"]],
            "model_md5": dvc[reference["merged"]], "turbomind_md5": dvc[reference["turbomind"]]}


def log_curves_and_plots(mlflow, plots_dir: Path) -> None:
    """The loss curve as a metric history (MLflow draws and compares it), and as a PNG."""
    curve_path = plots_dir / "train_loss.csv"
    if not curve_path.exists():
        return
    rows = list(csv.DictReader(curve_path.open()))
    for row in rows:
        mlflow.log_metric("train.loss", float(row["loss"]), step=int(row["step"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(xlabel="step", ylabel="train loss (assistant tokens)", title="LoRA SFT loss")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/train_loss.png")
    plt.close(fig)
    mlflow.log_artifacts(str(plots_dir), "plots")


def log_sample_generations(mlflow, predictions: Path, n: int) -> None:
    if predictions.exists():
        rows = read_jsonl(predictions)[:n]
        mlflow.log_text("\n\n".join(json.dumps(r, ensure_ascii=False, indent=1) for r in rows), "sample_generations.txt")


def log_model(mlflow, args, reference: dict):
    """Log the pyfunc model (stages/registered_model.py): the adapter folder, plus the merged folder when
    log_weights is merged, copied file by file. No model is loaded: nothing here imports torch."""
    import shutil
    import tempfile

    # MLflow names an artifact folder after its source: the chain's last adapter (models/dpo_adapter)
    # is logged as "adapter", where upload and registered_model look for it
    staging = Path(tempfile.mkdtemp(prefix="register."))
    shutil.copytree(args.adapter, staging / "adapter")
    artifacts = {"adapter": str(staging / "adapter")}
    if reference["log_weights"] == "merged":
        artifacts["merged"] = str(Path(args.merged).resolve())
    base = reference["base"]
    model_config = {"base_path": base["path"], "base_model_id": base["model_id"] if base["source"] == "hf" else "",
                    "base_revision": base["revision"], "trust_remote_code": base["trust_remote_code"], "max_new_tokens": 128}
    # explicit requirements: inferring them would load the model in a subprocess
    requirements = [f"{name}=={installed_version(name).split('+')[0]}" for name in ["mlflow", "torch", "transformers", "peft"]]
    metadata = {"tunepipe": {k: reference[k] for k in ["log_weights", "base", "dvc_md5"]}}
    try:
        return mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts=artifacts,
                                       model_config=model_config, metadata=metadata, pip_requirements=requirements)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    run_stage(main)
