"""register: log one complete MLflow run for this experiment and register its model version.

DVC skips stages whose deps did not change, so no single process sees every stage run. This
stage reads what they left behind instead: params.yaml (flattened), every metrics file, the loss
curve, dvc.lock's hashes of the data and the model, and the git commit. Then it logs the merged
model, registers it as a new version of the registered model, points the alias at it and tags
the version with the eval scores. Tracking store: MLFLOW_TRACKING_URI if set, else register.tracking_uri.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
from pathlib import Path

import yaml

from stages.common import Params, StageError, load_params, read_jsonl, run_stage, write_json


class RegisterParams(Params):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tunepipe"
    model_name: str = "tunepipe-demo"
    alias: str = "candidate"         # moved to each new version; promote to @champion after review
    sample_generations: int = 5


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


def lock_hashes(lock_path: Path) -> dict:
    """md5 of every stage out recorded in dvc.lock: what data and which weights this run used."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            hashes[out["path"]] = out.get("md5", "")
    return hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics-dir", default="metrics")
    ap.add_argument("--plots-dir", default="plots")
    ap.add_argument("--merged", default="models/merged")
    ap.add_argument("--predictions", default="eval/predictions.jsonl")
    ap.add_argument("--lock", default="dvc.lock")
    ap.add_argument("--out", default="registry/record.json")
    args = ap.parse_args()
    p = load_params("register", RegisterParams)

    # The merged model is local; without this MLflow asks the Hugging Face hub for a model card.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mlflow
    from mlflow import MlflowClient

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", p.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(p.experiment)
    all_params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    metrics = {}
    for path in sorted(Path(args.metrics_dir).glob("*.json")):
        flat = flatten(json.loads(path.read_text()), path.stem + ".")
        metrics.update({k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    hashes = lock_hashes(Path(args.lock))
    data_hash = hashes.get("data/split", "")
    model_hash = hashes.get("models/merged", "")
    tags = {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "data_md5": data_hash, "model_md5": model_hash, "train_backend": all_params["train"]["backend"],
            **{f"dvc_lock.{path}": md5 for path, md5 in hashes.items()}}

    run_name = os.environ.get("DVC_EXP_NAME") or f"{all_params['train']['backend']}-{tags['git_commit'][:8]}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(all_params).items()})
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)
        log_curves_and_plots(mlflow, Path(args.plots_dir))
        for extra in ["params.yaml", args.lock, args.predictions]:
            if Path(extra).exists():
                mlflow.log_artifact(extra)
        mlflow.log_artifacts(args.metrics_dir, "metrics")
        log_sample_generations(mlflow, Path(args.predictions), p.sample_generations)
        model_info = log_merged_model(mlflow, args.merged)

        client = MlflowClient()
        version = mlflow.register_model(model_info.model_uri, p.model_name, tags={
            "git_commit": tags["git_commit"], "data_md5": data_hash, "model_md5": model_hash, "run_id": run.info.run_id,
            **{k: str(v) for k, v in metrics.items() if k.startswith("eval.")}})
        client.set_registered_model_alias(p.model_name, p.alias, version.version)

    record = {"run_id": run.info.run_id, "experiment": p.experiment, "tracking_uri": tracking_uri, "model_name": p.model_name,
              "version": int(version.version), "alias": p.alias, "model_uri": f"models:/{p.model_name}/{version.version}",
              "git_commit": tags["git_commit"], "data_md5": data_hash, "model_md5": model_hash}
    write_json(args.out, record)
    print(f"register: run {run.info.run_id}, {p.model_name} version {version.version} @{p.alias} ({tracking_uri})")


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


def log_merged_model(mlflow, merged: str):
    """Log the merged model with MLflow's transformers flavour (a LoggedModel) for registration."""
    if not Path(merged, "config.json").exists():
        raise StageError(f"{merged}: no merged model (run the merge stage)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch
    import transformers

    from stages.remote_code import load_kwargs

    model = AutoModelForCausalLM.from_pretrained(merged, **load_kwargs(merged))  # with the code it ships, if any
    tokenizer = AutoTokenizer.from_pretrained(merged, **load_kwargs(merged))
    # pip_requirements given explicitly: MLflow's inference adds torchvision, which is not installed
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
        pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])


if __name__ == "__main__":
    run_stage(main)
