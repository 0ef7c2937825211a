"""review: one report per registered model version, for the person who decides whether it ships.

Reads what register recorded (registry/record.json: run id, model version, commit, hashes), the
files the other stages left (metrics/*.json, plots/*.csv, the rejected rows, the split, the test
answers, params.yaml, dvc.lock, the environments' pin files) and, through MlflowClient, the
champion the version is measured against: the @champion of the model when this version was
registered (the gate's `gate.champion_before` tag where register wrote one, else the alias now, if
it names another version). Writes the same report twice, registry/review.html (one self-contained
page: stages/review_html.py) and registry/review.md, and logs both to the version's MLflow run
under review/. Sections: data card, params against the champion, scores, loss curve, side-by-side
answers on the test split (largest changes first) and what reproduces the version.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import yaml

from stages.common import Params, StageError, atomic_path, load_params, read_jsonl, run_stage
from stages.dvc_hashes import lock_hashes
from stages.review_html import Chart, Code, Section, Table, Text, is_number, render_html, render_markdown


# a rejected row is its record plus the reason and what clean added (duplicate_of, placeholder, ...)
RECORD_KEYS = {"id", "source", "messages", "meta", "text", "tools", "rejected", "reason"}


class ReviewParams(Params):
    champion_alias: str = "champion"             # the alias of the version in production
    base: str = "base"                           # eval model abbrs (metrics/eval.json, predictions)
    candidate: str = "merged"
    quantized: list[str] = ["turbomind_w4a16_served", "turbomind_w4a16_dequant"]  # the first one evaluated
    answers: int = 20                            # test conversations shown side by side
    rejected_examples: int = 3                   # rejected rows shown per reason
    max_chars: int = 400                         # longer texts are cut in the report


def eval_scores(tree: dict) -> dict[tuple[str, str, str], float]:
    """Eval scores as {(set, model, metric): value}, from any shape they come in:
    {set: {model: {metric: v}}} (metrics/eval.json), {model: {metric: v}} (one set, named "eval"),
    or flat "eval.<set>.<model>.<metric>" keys (an MLflow run's metrics, a version's tags).
    Entries that are not numbers (a set recorded as skipped) are left out."""
    scores = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            for inner, leaf in value.items():
                if isinstance(leaf, dict):
                    scores.update({(key, inner, m): float(v) for m, v in leaf.items() if is_number(v)})
                elif is_number(leaf):
                    scores[("eval", key, inner)] = float(leaf)
        elif key.startswith("eval.") and key.count(".") >= 3:
            try:
                scores[tuple(key.removeprefix("eval.").split(".", 2))] = float(value)
            except (TypeError, ValueError):
                pass
    return scores


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_mlflow_param(value) -> str:
    """A param as register logged it (lists and dicts as JSON) and MLflow stores it (str)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def short(text, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: Path) -> dict:
    if not path.exists():
        raise StageError(f"{path}: not found (run the stage that writes it)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []


# ---------------------------------------------------------------- MLflow

def champion_of(client, record: dict, version_tags: dict, alias: str):
    """(the champion version to compare with or None, a sentence saying which it is and why)."""
    from mlflow.exceptions import MlflowException

    name, version = record["model_name"], str(record["version"])
    before = version_tags.get("gate.champion_before")
    if before and before != "none":
        return client.get_model_version(name, before), f"version {before}, @{alias} when version {version} was registered"
    if before == "none":
        return None, f"no @{alias} before version {version}: it is the first to pass the gate, nothing to compare with"
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, f"{name} has no @{alias} alias yet: nothing to compare with"
    if str(current.version) == version:
        return None, f"version {version} is @{alias} itself and records no earlier one: nothing to compare with"
    return current, f"version {current.version} (@{alias} now)"


def champion_predictions(champion_run: str, tmp: Path) -> list[dict]:
    """The champion's test answers, which register logged as its run's predictions.jsonl (if it did)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    try:
        return read_jsonl(mlflow.artifacts.download_artifacts(run_id=champion_run, artifact_path="predictions.jsonl",
                                                              dst_path=str(tmp)))
    except (MlflowException, OSError):
        return []


# ---------------------------------------------------------------- sections

def data_card(inputs: dict, p: ReviewParams) -> Section:
    clean, ingest, split = inputs["clean"], inputs["ingest"], inputs["split"]
    formats = {path: s.get("format", "") for path, s in ingest.get("sources", {}).items()}
    sources = [[path, formats.get(path, ""), s["rows_in"], s["rows_kept"], s["rows_rejected"],
                ", ".join(f"{r} {n}" for r, n in s["rejected_by_reason"].items())]
               for path, s in clean.get("by_source", {}).items()]
    blocks = [Text(f"{clean['rows_in']} rows in, {clean['rows_kept']} kept, {clean['rows_rejected']} rejected. "
                   f"Fixes: {json.dumps(clean.get('fixes', {}))}; PII redacted: {json.dumps(clean.get('pii_redacted', {}))}; "
                   f"near-duplicate groups: {clean.get('near_duplicate_groups', 0)}; conflicting questions: "
                   f"{clean.get('conflicting_questions', 0)}."),
              Table(["source", "format", "rows in", "kept", "rejected", "rejected by reason"], sources, "Sources"),
              Table(["reason", "rows"], [[r, n] for r, n in clean.get("rejected_by_reason", {}).items()],
                    "Rejected rows by reason")]
    by_source = split.get("rows_per_source", {})
    blocks.append(Table(["split", "rows (file)", "rows by source"],
                        [[name, n, ", ".join(f"{s} {k}" for s, k in by_source.get(name, {}).items())]
                         for name, n in inputs["split_rows"].items()],
                        f"Split (data/split; leakage rows: {split.get('leakage_rows', 'n/a')})"))
    blocks.append(Table(["text", "p50 chars", "p90 chars", "max chars"],
                        [[k.removesuffix("_chars"), v.get("p50"), v.get("p90"), v.get("max")]
                         for k, v in clean.get("lengths", {}).items()], "Lengths of kept rows"))
    hist = inputs["lengths"]
    last = max([i for i, r in enumerate(hist) if any(int(v) for k, v in r.items() if k != "chars")] or [0])
    hist = hist[:last + 1]
    if hist:
        edges = [int(r["chars"]) for r in hist]
        labels = [f"{e}-{n - 1}" for e, n in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
        blocks.append(Chart("bars", "Kept rows by length (plots/lengths.csv)", "chars", "rows",
                            {k: [int(r[k]) for r in hist] for k in hist[0] if k != "chars"}, labels))
    examples = defaultdict(list)
    for row in inputs["rejected"]:
        if len(examples[row.get("reason", "")]) < p.rejected_examples:
            examples[row.get("reason", "")].append(row)
    blocks.append(Table(["reason", "source", "detail", "conversation (system prompt left out)"],
                        [[reason, f"{r.get('source', {}).get('file', '')}:{r.get('source', {}).get('row', '')}",
                          ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}"
                                    for k, v in r.items() if k not in RECORD_KEYS),
                          short(" / ".join(f"{m['role']}: {m['content']}" for m in r.get("messages", [])
                                           if m.get("role") != "system") or r.get("text", ""), p.max_chars)]
                         for reason, rows in sorted(examples.items()) for r in rows],
                        f"Rejected rows, at most {p.rejected_examples} per reason (data/cleaned/rejected.jsonl)"))
    return Section("Data card", blocks)


def params_section(params: dict, champion_params: dict | None, champion_note: str) -> Section:
    flat = {k: as_mlflow_param(v) for k, v in flatten(params).items()}
    if champion_params is None:
        return Section("Params vs champion", [Text(f"Champion: {champion_note}."),
                                              Table(["param", "this version"], sorted([k, v] for k, v in flat.items()),
                                                    "Every param of this version")])
    keys = sorted(set(flat) | set(champion_params))
    diff = [[k, champion_params.get(k, "(absent)"), flat.get(k, "(absent)")]
            for k in keys if champion_params.get(k) != flat.get(k)]
    return Section("Params vs champion", [
        Text(f"Champion: {champion_note}. {len(diff)} params differ, {len(keys) - len(diff)} are equal."),
        Table(["param", "champion", "this version"], diff, "Params that differ")])


def scores_section(inputs: dict, champion: dict, record: dict, p: ReviewParams) -> Section:
    champion_metrics = champion["metrics"]
    ours, theirs = eval_scores(inputs["eval"]), eval_scores(champion_metrics or {})
    quantized = next((q for q in p.quantized if q in {m for _, m, _ in ours}), p.quantized[0])
    models = [p.base, p.candidate, quantized]
    others = sorted({m for _, m, _ in ours} - set(models))
    rows = []
    for s, metric in sorted({(s, m) for s, _, m in ours}):
        get = lambda model, table=ours: table.get((s, model, metric))  # noqa: E731
        cand, champ, quant = get(p.candidate), get(p.candidate, theirs), get(quantized)
        rows.append([s, metric, get(p.base), cand, champ, None if None in (cand, champ) else cand - champ,
                     quant, None if None in (quant, cand) else quant - cand, get(quantized, theirs),
                     *(get(m) for m in others)])
    headers = ["set", "metric", f"base ({p.base})", f"candidate ({p.candidate})", "champion", "candidate − champion",
               f"quantized ({quantized})", "quantized − candidate", "champion quantized", *others]
    blocks = [Text(record["gate_summary"])] if record.get("gate_summary") else []
    if champion["gate"]:
        blocks.append(Table(["promotion gate", "outcome"], champion["gate"], "Promotion gate (version tags gate.*)"))
    blocks.append(Table(headers, rows, "Eval scores (metrics/eval.json; champion from its MLflow run)"))
    stage = {k: v for k, v in flatten(inputs["metrics"]).items() if is_number(v) and not k.startswith("eval.")}
    blocks.append(Table(["metric", "this version", "champion"],
                        [[k, v, (champion_metrics or {}).get(k)] for k, v in sorted(stage.items())],
                        "Stage metrics (metrics/*.json)"))
    return Section("Scores", blocks)


def loss_section(inputs: dict, champion_loss: list) -> Section:
    curve, train = inputs["loss"], inputs["metrics"].get("train", {})
    series = {f"this version: {col}": [(float(r["step"]), float(r[col])) for r in curve if r.get(col) not in ("", None)]
              for col in (curve[0] if curve else {}) if col not in ("step", "epoch")}
    if champion_loss:
        series["champion: loss"] = champion_loss
    blocks = [Text(f"Final train loss {train.get('train_loss_final')}; validation loss {train.get('val_loss_before')} "
                   f"before training, {train.get('val_loss_after')} after.")]
    if any(series.values()):
        blocks.append(Chart("line", "Train loss by step (plots/train_loss.csv)", "step", "loss",
                            {k: v for k, v in series.items() if v}))
    else:
        blocks.append(Text("No loss curve (plots/train_loss.csv is missing or empty)."))
    return Section("Loss curve", blocks)


def answers_section(predictions: list[dict], champion_preds: list[dict], p: ReviewParams) -> Section:
    """Test answers side by side, the ones the candidate changed most first: changed from the champion's
    answer when the champion's answers are at hand, else from the base model's."""
    by_row = defaultdict(dict)
    for row in predictions:
        by_row[(row.get("set", ""), row["id"])][row["model"]] = row
    champion = {(r.get("set", ""), r["id"]): r["prediction"] for r in champion_preds if r.get("model") == p.candidate}
    against = "champion" if champion else "base"
    with_sets = any(s for s, _ in by_row)  # predictions of several eval sets name theirs
    quantized = next((q for q in p.quantized if any(q in models for models in by_row.values())), p.quantized[0])
    rows = []
    for key, models in by_row.items():
        first = next(iter(models.values()))
        answer = {model: models.get(model, {}).get("prediction", "") for model in [p.base, p.candidate, quantized]}
        other = champion.get(key, "") if champion else answer[p.base]
        change = 1 - difflib.SequenceMatcher(None, other, answer[p.candidate], autojunk=False).ratio()
        question = next((m["content"] for m in reversed(first.get("prompt", [])) if m.get("role") == "user"), "")
        texts = [question, first.get("reference", ""), answer[p.base], *([other] if champion else []),
                 answer[p.candidate], answer[quantized]]
        rows.append([round(change, 3), *([key[0]] if with_sets else []), *(short(t, p.max_chars) for t in texts)])
    rows.sort(key=lambda r: -r[0])
    headers = [f"change vs {against}", *(["set"] if with_sets else []), "question", "reference", "base",
               *(["champion"] if champion else []), "candidate", "quantized"]
    return Section("Side-by-side answers", [
        Text(f"{len(rows)} test conversations (eval/predictions.jsonl); the {min(p.answers, len(rows))} whose candidate "
             f"answer differs most from the {against}'s (1 − difflib similarity) are shown."),
        Table(headers, rows[:p.answers], "Answers on the test split")])


def reproduce_section(record: dict, inputs: dict, run_tags: dict) -> Section:
    sha, ref = record.get("git_commit", "unknown"), f"{record['model_name']}/{record['version']}"
    blocks = [Table(["what", "value"], [
        ["git commit", sha], ["git working tree dirty at registration", run_tags.get("git_dirty", "unknown")],
        ["model", f"{record['model_uri']} (@{record.get('alias', '')})"], ["MLflow run", record["run_id"]],
        ["data/split md5", record.get("data_md5", "")], ["dvc.lock sha256", inputs["lock_sha256"]]], "Version")]
    if run_tags.get("git_dirty") == "True":
        blocks.append(Text("Warning: the working tree had uncommitted changes when this version was registered; "
                           "the commit alone may not reproduce it."))
    blocks += [Table(["out", "md5"], sorted(map(list, inputs["lock_outs"].items())), "dvc.lock: md5 of every stage out"),
               Table(["environment file", "sha256"], inputs["env_hashes"], "Environments (envs/*)"),
               Text("Reproduce (dvc and tunepipe from .venvs/core/bin after ./setup.sh):"),
               Code(f"git checkout {sha} && dvc pull && dvc repro\ntunepipe reproduce {ref}")]
    return Section("Reproducibility", blocks)


# ---------------------------------------------------------------- load, build, write

def load_inputs(args) -> dict:
    metrics_dir = Path(args.metrics_dir)
    metrics = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(metrics_dir.glob("*.json"))}
    for needed in ["clean", "eval"]:
        if needed not in metrics:
            raise StageError(f"{metrics_dir / needed}.json: not found (run the {needed} stage)")
    split_dir, lock = Path(args.split), Path(args.lock)
    return {
        "metrics": metrics, "clean": metrics["clean"], "ingest": metrics.get("ingest", {}),
        "split": metrics.get("split", {}), "eval": metrics["eval"],
        "split_rows": {f.stem: sum(1 for line in f.open(encoding="utf-8") if line.strip())
                       for f in sorted(split_dir.glob("*.jsonl"))},
        "loss": read_csv(Path(args.plots_dir) / "train_loss.csv"),
        "lengths": read_csv(Path(args.plots_dir) / "lengths.csv"),
        "rejected": read_jsonl(args.rejected) if Path(args.rejected).exists() else [],
        "predictions": read_jsonl(args.predictions) if Path(args.predictions).exists() else [],
        "params": yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {},
        "lock_outs": lock_hashes(lock), "lock_sha256": sha256(lock) if lock.exists() else "(no dvc.lock)",
        "env_hashes": [[f.as_posix(), sha256(f)] for f in sorted(Path(args.envs).glob("*")) if f.is_file()],
    }


def from_mlflow(record: dict, p: ReviewParams, tmp: Path) -> dict:
    """The champion's params, metrics, loss history and answers, and this run's tags."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run_tags = client.get_run(record["run_id"]).data.tags
        version_tags = client.get_model_version(record["model_name"], str(record["version"])).tags
        champion, note = champion_of(client, record, version_tags, p.champion_alias)
    except MlflowException as e:
        raise StageError(f"MLflow ({record['tracking_uri']}): cannot read run {record['run_id']} / "
                         f"{record['model_name']} version {record['version']}: {str(e).splitlines()[0]}") from None
    gate = [[k.removeprefix("gate."), v] for k, v in sorted(version_tags.items()) if k.startswith("gate.")]
    found = {"run_tags": run_tags, "gate": gate, "note": note, "params": None, "metrics": None, "loss": [], "predictions": []}
    if champion is not None:
        run = client.get_run(champion.run_id)
        found.update(params=run.data.params, metrics=run.data.metrics,
                     loss=[(float(m.step), m.value) for m in client.get_metric_history(champion.run_id, "train.loss")],
                     predictions=champion_predictions(champion.run_id, tmp))
    return found


def build(record: dict, inputs: dict, champion: dict, p: ReviewParams) -> tuple[str, str, list[Section]]:
    title = f"Review: {record['model_name']} version {record['version']}"
    subtitle = (f"{record['model_uri']} @{record.get('alias', '')}, MLflow run {record['run_id']}, commit "
                f"{record.get('git_commit', 'unknown')}. Champion: {champion['note']}.")
    sections = [data_card(inputs, p), params_section(inputs["params"], champion["params"], champion["note"]),
                scores_section(inputs, champion, record, p), loss_section(inputs, champion["loss"]),
                answers_section(inputs["predictions"], champion["predictions"], p),
                reproduce_section(record, inputs, champion["run_tags"])]
    return title, subtitle, sections


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", default="registry/record.json")
    ap.add_argument("--metrics-dir", default="metrics")
    ap.add_argument("--plots-dir", default="plots")
    ap.add_argument("--rejected", default="data/cleaned/rejected.jsonl")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--predictions", default="eval/predictions.jsonl")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--lock", default="dvc.lock")
    ap.add_argument("--envs", default="envs")
    ap.add_argument("--html", default="registry/review.html")
    ap.add_argument("--md", default="registry/review.md")
    args = ap.parse_args()
    p = load_params("review", ReviewParams)

    import mlflow

    record, inputs = read_json(Path(args.record)), load_inputs(args)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record["tracking_uri"]))
    with tempfile.TemporaryDirectory() as tmp:  # the champion's downloaded answers
        champion = from_mlflow(record, p, Path(tmp))
    title, subtitle, sections = build(record, inputs, champion, p)
    write_text(args.html, render_html(title, subtitle, sections))
    write_text(args.md, render_markdown(title, subtitle, sections))
    for path in [args.html, args.md]:
        mlflow.MlflowClient().log_artifact(record["run_id"], path, "review")
    print(f"review: {args.html} and {args.md} for {record['model_uri']} (champion: {champion['note']}); "
          f"logged to run {record['run_id']}")


if __name__ == "__main__":
    run_stage(main)
