"""The promotion gate (stages/promotion.py) on its own, then through register and upload against a real
(SQLite) MLflow store: a worse experiment is refused @champion and cannot be uploaded."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_stage
from stages.common import StageError
from stages.promotion import GateParams, decide, eval_scores, gate_tags, tag_scores
from test_register_upload import prepare

GATE = GateParams()  # main rougeL of merged, max_drop 1.0, max_quantized_gap 3.0


def scores(merged: float, quantized: float | None = None, base: float = 8.08, rouge1: float | None = None) -> dict:
    """metrics/eval.json as the eval stage writes it."""
    models = {"base": {"rouge1": 8.15, "rougeL": base},
              "merged": {"rouge1": merged + 0.86 if rouge1 is None else rouge1, "rougeL": merged}}
    if quantized is not None:
        models["turbomind_w4a16_dequant"] = {"rouge1": quantized + 0.58, "rougeL": quantized}
    return {"demo_qa": models}


def test_eval_scores_are_name_value_pairs_and_tags_read_back_the_same():
    pairs = eval_scores(scores(77.96, 77.52))
    assert ("demo_qa.merged.rougeL", 77.96) in pairs and ("demo_qa.turbomind_w4a16_dequant.rouge1", 78.1) in pairs
    assert len(pairs) == 6
    tags = {f"eval.{name}": str(value) for name, value in pairs} | {"git_commit": "abc", "eval.test_rows": "12"}
    assert sorted(tag_scores(tags)) == sorted(pairs)


def test_the_first_version_passes_against_the_base_alone():
    passed, outcomes = decide(eval_scores(scores(77.96, 77.52)), None, GATE)
    status = {o.rule: o.status for o in outcomes}
    assert passed and status == {"beats_base": "pass", "main_metric": "skipped", "max_drop": "skipped",
                                 "max_quantized_gap": "pass"}
    tags = gate_tags(passed, outcomes, None)
    assert tags["gate.decision"] == "pass" and tags["gate.champion_before"] == "none"
    assert tags["gate.beats_base"] == "pass: demo_qa 77.96 > base 8.08"
    assert tags["gate.max_quantized_gap"] == "pass: largest gap 0.72 (demo_qa.rouge1) <= 3"


def test_a_first_version_no_better_than_its_base_fails():
    passed, outcomes = decide(eval_scores(scores(8.0, base=8.08)), None, GATE)
    assert not passed and outcomes[0].text() == "fail: demo_qa 8 <= base 8.08"


def test_a_better_version_passes_against_the_champion():
    champion = eval_scores(scores(77.0, 76.5))
    passed, outcomes = decide(eval_scores(scores(77.96, 77.52)), champion, GATE)
    assert passed and all(o.status == "pass" for o in outcomes)


@pytest.mark.parametrize("new, rule, text", [
    (scores(76.96, 76.9), "main_metric", "fail: demo_qa rougeL 76.96 < champion 77"),
    # the main metric holds, but another score falls by 1.5 > max_drop 1.0
    (scores(77.0, 76.9, rouge1=76.36), "max_drop", "fail: largest drop 1.5 (demo_qa.merged.rouge1) > 1"),
    (scores(79.0, 75.6), "max_quantized_gap", "fail: largest gap 3.68 (demo_qa.rouge1) > 3"),
])
def test_each_rule_can_fail_the_version(new, rule, text):
    champion = eval_scores(scores(77.0, 76.5))
    passed, outcomes = decide(eval_scores(new), champion, GATE)
    assert not passed
    assert {o.rule: o.text() for o in outcomes}[rule] == text
    assert [o.rule for o in outcomes if o.status == "fail"] == [rule]


def test_a_main_metric_the_eval_does_not_write_is_an_error():
    with pytest.raises(StageError, match=r"register.gate: no eval score named <set>.merged.bleu"):
        decide(eval_scores(scores(77.0)), None, GateParams(main_metric="bleu"))


def register_with(folder, eval_json: dict) -> dict:
    (folder / "metrics/eval.json").write_text(json.dumps(eval_json))
    run_stage(folder, "register")
    return json.loads((folder / "registry/record.json").read_text())


def test_two_experiments_the_worse_is_refused_champion_and_cannot_be_uploaded(pipeline, workdir, monkeypatch, capsys):
    from mlflow import MlflowClient

    prepare(pipeline, workdir, monkeypatch)
    first = register_with(workdir, scores(77.96, 77.52))
    assert (first["version"], first["gate"], first["champion"]) == (1, "pass", 1)
    run_stage(workdir, "upload")
    assert json.loads((workdir / "upload/receipt.json").read_text())["model_uri"] == "models:/tunepipe-demo/1"

    capsys.readouterr()
    worse = register_with(workdir, scores(75.0, 74.8))
    line = next(x for x in capsys.readouterr().out.splitlines() if "gate" in x)
    assert line.startswith("register: gate fail against champion v1 and the base:")
    assert "main_metric fail: demo_qa rougeL 75 < champion 77.96" in line
    assert (worse["version"], worse["gate"], worse["champion"]) == (2, "fail", 1)
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("tunepipe-demo", "champion").version) == 1
    assert int(client.get_model_version_by_alias("tunepipe-demo", "candidate").version) == 2
    tags = client.get_model_version("tunepipe-demo", "2").tags
    assert tags["gate.decision"] == "fail" and tags["gate.champion_before"] == "1"
    assert re.fullmatch(r"fail: largest drop 2\.96 \(demo_qa\.merged\.rouge[1L]\) > 1", tags["gate.max_drop"])
    assert tags["gate.beats_base"].startswith("pass") and tags["registration"] == "complete"

    with pytest.raises(StageError, match=r"tunepipe-demo version 2 is not @champion \(version 1 is\)"):
        run_stage(workdir, "upload", "--version", "2")
    assert not (workdir / "dist/models/tunepipe-demo/v2").exists()
    run_stage(workdir, "upload")  # what a `dvc exp run` does next: the champion is already published
    receipt = json.loads((workdir / "upload/receipt.json").read_text())
    assert receipt["skipped"].startswith("models:/tunepipe-demo/1 (@champion) is already uploaded")
    assert not (workdir / "dist/models/tunepipe-demo/v2").exists()

    better = register_with(workdir, scores(78.5, 78.0))
    assert (better["version"], better["gate"], better["champion"]) == (3, "pass", 3)
    run_stage(workdir, "upload", "--version", "3")
    assert (workdir / "dist/models/tunepipe-demo/v3/README.md").exists()


def test_upload_skips_when_no_version_is_champion(pipeline, workdir, monkeypatch):
    prepare(pipeline, workdir, monkeypatch)
    record = register_with(workdir, scores(8.0, 7.9))  # no better than its base
    assert (record["gate"], record["champion"]) == ("fail", None)
    run_stage(workdir, "upload")
    receipt = json.loads((workdir / "upload/receipt.json").read_text())
    assert receipt["skipped"] == "no version of tunepipe-demo is @champion yet (register's gate promotes one)"
    assert not (workdir / "dist").exists()
