"""The review stage on small hand-made inputs and a real (SQLite) MLflow store in a temporary folder.

The store holds the model `tunepipe-demo` with version 1 (@champion: its run has params, eval
metrics, a loss history and test answers) and version 2 (the candidate the report is about), and
two models for the other champion cases. Text in the data holds <script> to check the escaping.
The page is rendered in headless Chromium (Debian's chromium, driven by playwright) when there is one.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_stage, write_params
from stages.review import eval_scores

SHA = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = "<script>alert('x')</script>"
EVAL = {"demo_qa": {"base": {"rougeL": 8.08, "rouge1": 8.15},
                    "merged": {"rougeL": 77.96, "rouge1": 78.82},
                    "turbomind_w4a16_dequant": {"rougeL": 77.52, "rouge1": 78.1}}}
CHAMPION_EVAL = {"eval.demo_qa.merged.rougeL": 75.5, "eval.demo_qa.merged.rouge1": 77.0,
                 "eval.demo_qa.turbomind_w4a16_dequant.rougeL": 74.0, "train.val_loss_after": 1.5}
QUESTIONS = {"a1": "What is aspirin for?", "b2": f"Is {SCRIPT} safe?", "c3": "Dose of ibuprofen?"}
ANSWERS = {  # id: (base, merged, quantized, champion's merged)
    "a1": ("zzz", "Aspirin relieves pain.", "Aspirin relieves pain.", "Aspirin relieves pain."),
    "b2": ("qqq", f"No {SCRIPT}.", "No.", "Yes, it is safe."),
    "c3": ("www", "200 mg.", "200 mg.", "400 mg."),
}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def predictions(model_answers: dict[str, str]) -> str:
    return "".join(json.dumps({"model": model, "id": i, "prompt": [{"role": "user", "content": QUESTIONS[i]}],
                               "prediction": answer, "reference": f"ref {i}"}) + "\n"
                   for model, answers in model_answers.items() for i, answer in answers.items())


def write_inputs(folder: Path) -> None:
    params = write_params(folder)
    rejected = [{"id": "r1", "source": {"file": "data/raw/x.xlsx", "row": 4}, "reason": "placeholder_answer",
                 "messages": [{"role": "user", "content": "What about X?"}, {"role": "assistant", "content": "N/A"}]},
                {"id": "r2", "source": {"file": "data/raw/x.xlsx", "row": 9}, "reason": "duplicate",
                 "duplicate_of": {"file": "data/raw/x.xlsx", "row": 2},
                 "messages": [{"role": "user", "content": SCRIPT}, {"role": "assistant", "content": "ok"}]}]
    write(folder / "data/cleaned/rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
    for name, n in {"train": 5, "val": 2, "test": 3}.items():
        write(folder / f"data/split/{name}.jsonl", "".join(json.dumps({"id": f"{name}{k}"}) + "\n" for k in range(n)))
    clean = {"rows_in": 12, "rows_kept": 10, "rows_rejected": 2, "rejected_by_reason": {"duplicate": 1, "placeholder_answer": 1},
             "by_source": {"data/raw/x.xlsx": {"rows_in": 12, "rows_kept": 10, "rows_rejected": 2,
                                               "rejected_by_reason": {"duplicate": 1, "placeholder_answer": 1}}},
             "fixes": {"unicode": 1}, "pii_redacted": {}, "near_duplicate_groups": 0, "conflicting_questions": 0,
             "lengths": {"answer_chars": {"p50": 57, "p90": 65, "max": 70}, "prompt_chars": {"p50": 33, "p90": 44, "max": 46}}}
    metrics = {"clean": clean, "eval": EVAL,
               "ingest": {"rows_total": 12, "sources": {"data/raw/x.xlsx": {"format": "table", "rows": 12}}},
               "split": {"leakage_rows": 0, "rows_per_source": {"train": {"data/raw/x.xlsx": 5}}},
               "train": {"train_loss_final": 1.194672, "val_loss_before": 4.905307, "val_loss_after": 1.173075}}
    for name, tree in metrics.items():
        write(folder / f"metrics/{name}.json", json.dumps(tree))
    write(folder / "plots/train_loss.csv", "step,epoch,loss\n1,1,4.13\n2,1,3.5\n3,2,2.25\n")
    write(folder / "plots/lengths.csv", "chars,prompt,answer\n0,0,0\n16,7,0\n32,3,8\n64,0,2\n128,0,0\n")
    write(folder / "eval/predictions.jsonl", predictions({
        "base": {i: a[0] for i, a in ANSWERS.items()}, "merged": {i: a[1] for i, a in ANSWERS.items()},
        "turbomind_w4a16_dequant": {i: a[2] for i, a in ANSWERS.items()}}))
    write(folder / "dvc.lock", yaml.safe_dump({"schema": "2.0", "stages": {
        "split": {"outs": [{"path": "data/split", "md5": "aaaa1111aaaa1111aaaa1111aaaa1111.dir"}]},
        "merge": {"outs": [{"path": "models/merged", "md5": "bbbb2222bbbb2222bbbb2222bbbb2222.dir"}]}}}))
    write(folder / "envs/core.txt", "mlflow==3.17.2\n")
    write(folder / "envs/core.lock", "mlflow==3.17.2 --hash=sha256:00\n")
    params["review"]["answers"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def log_run(mlflow, client, params: dict, metrics: dict, tags: dict | None = None) -> str:
    from stages.review import as_mlflow_param, flatten

    with mlflow.start_run() as run:
        mlflow.log_params({k: as_mlflow_param(v) for k, v in flatten(params).items()})
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags or {})
    return run.info.run_id


def register(client, name: str, run_id: str, tags: dict | None = None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already there
    return client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Inputs and an MLflow store: tunepipe-demo v1 @champion, v2 the candidate; `lonely` v1 with no
    alias; `gated` v1 whose tags say there was no champion before it (as register's gate writes)."""
    import mlflow
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("review")
    write_inputs(folder)
    uri = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tunepipe")
    client = MlflowClient()
    params = yaml.safe_load((folder / "params.yaml").read_text())
    champion_params = json.loads(json.dumps(params))
    champion_params["train"]["lr"] = 1.0e-3
    champion_params["train"]["lora"]["r"] = 8
    champion_run = log_run(mlflow, client, champion_params, CHAMPION_EVAL)
    for step, loss in enumerate([4.5, 3.9, 3.1], start=1):
        client.log_metric(champion_run, "train.loss", loss, step=step)
    write(folder / "champion/predictions.jsonl", predictions({"merged": {i: a[3] for i, a in ANSWERS.items()}}))
    client.log_artifact(champion_run, str(folder / "champion/predictions.jsonl"))
    v1 = register(client, "tunepipe-demo", champion_run)
    client.set_registered_model_alias("tunepipe-demo", "champion", v1)
    run_id = log_run(mlflow, client, params, {"eval.demo_qa.merged.rougeL": 77.96}, {"git_dirty": "False"})
    register(client, "tunepipe-demo", run_id)
    register(client, "lonely", run_id)
    register(client, "gated", run_id, {"gate.champion_before": "none", "gate.decision": "pass",
                                        "gate.beats_base": "pass: demo_qa rougeL 77.96 > base 8.08"})
    return {"folder": folder, "uri": uri, "run_id": run_id}


def review(store, monkeypatch, model: str = "tunepipe-demo", version: int = 2) -> tuple[str, str]:
    folder = store["folder"]
    record = {"run_id": store["run_id"], "tracking_uri": "sqlite:///elsewhere.db", "model_name": model,
              "version": version, "alias": "candidate", "model_uri": f"models:/{model}/{version}", "git_commit": SHA,
              "data_md5": "aaaa1111aaaa1111aaaa1111aaaa1111.dir"}
    write(folder / "registry/record.json", json.dumps(record))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # wins over the record's
    run_stage(folder, "review")
    return ((folder / "registry/review.html").read_text(encoding="utf-8"),
            (folder / "registry/review.md").read_text(encoding="utf-8"))


def test_eval_scores_reads_every_shape():
    expected = {("demo_qa", "merged", "rougeL"): 77.96, ("demo_qa", "base", "rougeL"): 8.08}
    nested = {"demo_qa": {"merged": {"rougeL": 77.96}, "base": {"rougeL": 8.08}}, "mmlu": {"skipped": "no data"}}
    flat = {"eval.demo_qa.merged.rougeL": 77.96, "eval.demo_qa.base.rougeL": "8.08", "train.loss": 1.0,
            "clean.rejected_by_reason.duplicate": 3}
    assert eval_scores(nested) == expected
    assert eval_scores(flat) == expected
    assert eval_scores({"merged": {"rougeL": 77.96}}) == {("eval", "merged", "rougeL"): 77.96}


def test_report_against_champion(store, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    page, md = review(store, monkeypatch)
    for text in [html.unescape(page), html.unescape(md)]:  # the text a reader sees
        for section in ["Data card", "Params vs champion", "Scores", "Loss curve", "Side-by-side answers",
                        "Reproducibility"]:
            assert section in text
        assert "version 1 (@champion now)" in text
        assert "12 rows in, 10 kept, 2 rejected" in text
        assert "placeholder_answer" in text and "data/raw/x.xlsx:4" in text
        assert 'duplicate_of: {"file": "data/raw/x.xlsx", "row": 2}' in text
        # params diff: exactly the two changed params, with both values
        assert "2 params differ" in text
        for row in ["train.lr", "0.001", "0.003", "train.lora.r"]:
            assert row in text
        # scores: candidate, champion, their difference, quantized gap, base
        for number in ["77.96", "75.5", "2.46", "77.52", "-0.44", "8.08", "78.82", "1.82", "74"]:
            assert number in text
        # side by side: answers=2 rows, largest change from the champion's answer first (b2, then c3; a1 unchanged)
        assert "change vs champion" in text
        assert text.index("Yes, it is safe.") < text.index("400 mg.")
        assert "Aspirin relieves pain." not in text
        # reproducibility
        assert f"git checkout {SHA} && dvc pull && dvc repro" in text
        assert "tunepipe reproduce tunepipe-demo/2" in text
        assert "bbbb2222bbbb2222bbbb2222bbbb2222.dir" in text
        for env in ["envs/core.txt", "envs/core.lock"]:
            assert hashlib.sha256((store["folder"] / env).read_bytes()).hexdigest() in text
        assert hashlib.sha256((store["folder"] / "dvc.lock").read_bytes()).hexdigest() in text
    assert page.count("<svg") == 2 and "<polyline" in page  # loss curve (this version + champion) and lengths
    assert "champion: loss" in page
    mlflow.set_tracking_uri(store["uri"])
    logged = {a.path for a in MlflowClient().list_artifacts(store["run_id"], "review")}
    assert logged == {"review/review.html", "review/review.md"}


def test_script_in_data_is_escaped(store, monkeypatch):
    page, md = review(store, monkeypatch)
    assert "<script" not in page.lower()          # no script of any kind on the page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in md.lower()
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in md


def test_no_champion_alias(store, monkeypatch):
    page, md = review(store, monkeypatch, model="lonely", version=1)
    for text in [html.unescape(page), html.unescape(md)]:
        assert "lonely has no @champion alias yet: nothing to compare with" in text
        assert "Every param of this version" in text and "train.lr" in text
        assert "change vs base" in text   # no champion answers: changes are measured from the base model
    page, _ = review(store, monkeypatch, model="gated", version=1)
    assert "no @champion before version 1: it is the first to pass the gate" in page
    assert "Promotion gate (version tags gate.*)" in page and "pass: demo_qa rougeL 77.96 &gt; base 8.08" in page


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium; setup.sh does it as root)")
    return path


def test_page_renders_in_chromium(store, monkeypatch):
    """The page in headless Chromium: no console error, no request beyond the file, every table and
    chart visible. TUNEPIPE_REVIEW_SCREENSHOT=<png> saves a full-page screenshot."""
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (envs/core.txt)")
    review(store, monkeypatch)
    url = (store["folder"] / "registry/review.html").as_uri()
    errors, requests = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(url, wait_until="load")
        tables = page.locator("table")
        visible = [tables.nth(i).is_visible() for i in range(tables.count())]
        heights = [tables.nth(i).bounding_box()["height"] for i in range(tables.count())]
        charts = [page.locator("svg").nth(i).bounding_box() for i in range(page.locator("svg").count())]
        headers = page.locator("h2").all_inner_texts()
        first_answer_row = page.locator("#side-by-side-answers tbody tr").first.inner_text()
        if os.environ.get("TUNEPIPE_REVIEW_SCREENSHOT"):
            page.screenshot(path=os.environ["TUNEPIPE_REVIEW_SCREENSHOT"], full_page=True)
        browser.close()
    assert errors == []
    assert requests == [url]
    assert len(visible) == 12 and all(visible) and all(h > 20 for h in heights)
    assert len(charts) == 2 and all(box["width"] > 600 and box["height"] > 250 for box in charts)
    assert headers == ["Data card", "Params vs champion", "Scores", "Loss curve", "Side-by-side answers", "Reproducibility"]
    assert SCRIPT in first_answer_row   # shown as text (the largest change), not run


def test_answers_of_several_eval_sets():
    """Predictions that name their eval set (several sets) get a set column; the biggest change comes first."""
    from stages.review import ReviewParams, answers_section

    rows = [{"set": s, "model": m, "id": "q", "prompt": [{"role": "user", "content": f"question {s}"}],
             "prediction": answer, "reference": "r"}
            for s, answers in {"exam": {"base": "A", "merged": "A"}, "demo_qa": {"base": "xyz", "merged": "abc"}}.items()
            for m, answer in answers.items()]
    table = answers_section(rows, [], ReviewParams()).blocks[1]
    assert table.headers[:3] == ["change vs base", "set", "question"]
    assert [r[:3] for r in table.rows] == [[1.0, "demo_qa", "question demo_qa"], [0.0, "exam", "question exam"]]
