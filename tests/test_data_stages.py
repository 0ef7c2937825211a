"""demo_data, ingest, clean, split: exact counts on the demo data, and clear errors on bad input."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_stage, write_params
from stages.common import StageError, read_jsonl


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_demo_data_is_deterministic(workdir):
    run_stage(workdir, "demo_data")
    first = {p.name: md5(p) for p in (workdir / "data/raw").iterdir()}
    run_stage(workdir, "demo_data")
    assert {p.name: md5(p) for p in (workdir / "data/raw").iterdir()} == first
    assert len(first) == 3


def test_ingest_reads_every_row(pipeline):
    records = read_jsonl(pipeline / "data/ingested/records.jsonl")
    metrics = json.loads((pipeline / "metrics/ingest.json").read_text())
    # 60 drugs x 5 question types + 3 duplicated rows in the sheet; one ShareGPT row per drug
    assert metrics["rows_per_source"] == {"data/raw/demo_medication_qa.xlsx": 303, "data/raw/demo_pharmacist_chat.jsonl": 60}
    assert len(records) == 363
    sheet_row = records[0]
    assert sheet_row["source"] == {"file": "data/raw/demo_medication_qa.xlsx", "row": 2}
    assert [m["role"] for m in sheet_row["messages"]] == ["system", "user", "assistant"]
    assert set(sheet_row["meta"]) == {"drug", "question_type"}
    chat_row = records[303]
    assert [m["role"] for m in chat_row["messages"]] == ["system", "user", "assistant"]


def test_clean_accounts_for_every_row(pipeline):
    metrics = json.loads((pipeline / "metrics/clean.json").read_text())
    assert metrics["rejected_by_reason"] == {"duplicate": 3, "empty_turn": 1, "placeholder_answer": 4}
    assert metrics["rows_in"] == metrics["rows_kept"] + metrics["rows_rejected"] == 363
    kept = read_jsonl(pipeline / "data/cleaned/records.jsonl")
    rejected = read_jsonl(pipeline / "data/cleaned/rejected.jsonl")
    assert len(kept) == 355 and len(rejected) == 8
    assert all(r["reason"] for r in rejected)
    assert len({r["id"] for r in kept}) == len(kept)
    text = json.dumps(kept, ensure_ascii=False)
    assert "\u00a0" not in text and "  " not in text  # NBSP and doubled spaces normalised away
    placeholders = [r["messages"][-1]["content"] for r in rejected if r["reason"] == "placeholder_answer"]
    assert sorted(placeholders) == ["No answers", "No answers", "Unanswerable", "Unanswerable"]


def test_split_is_seeded_and_leak_free(pipeline, workdir):
    metrics = json.loads((pipeline / "metrics/split.json").read_text())
    assert metrics == {"train_rows": 283, "val_rows": 36, "test_rows": 36, "leakage_rows": 0}
    (workdir / "data/cleaned").mkdir(parents=True)
    (workdir / "data/cleaned/records.jsonl").write_bytes((pipeline / "data/cleaned/records.jsonl").read_bytes())
    run_stage(workdir, "split")
    for name in ["train", "val", "test"]:
        assert md5(workdir / f"data/split/{name}.jsonl") == md5(pipeline / f"data/split/{name}.jsonl")
    xtuner = read_jsonl(pipeline / "data/split/xtuner/train.jsonl")
    assert len(xtuner) == 283 and set(xtuner[0]["conversation"][0]) == {"system", "input", "output"}


@pytest.mark.parametrize("changes, message", [
    ({"split": {"seed": "abc"}}, "split.seed: Input should be a valid integer"),
    ({"split": {"test_ratoi": 0.2}}, "split.test_ratoi: Extra inputs are not permitted"),
    ({"train": {"backend": "deepspeed"}}, "train.backend: Input should be 'hf' or 'xtuner'"),
])
def test_bad_params_name_the_key(workdir, changes, message):
    write_params(workdir, changes)
    stage = next(iter(changes))
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_source_file_is_named(workdir):
    write_params(workdir, {"ingest": {"sources": [{"path": "data/raw/nope.xlsx", "format": "table"}]}})
    with pytest.raises(StageError, match="data/raw/nope.xlsx: file not found"):
        run_stage(workdir, "ingest")


def test_missing_column_and_bad_json_are_named(workdir):
    run_stage(workdir, "demo_data")
    write_params(workdir, {"ingest": {"sources": [{"path": "data/raw/demo_medication_qa.xlsx", "format": "table",
                                                   "question": "Query", "answer": "Answer"}]}})
    with pytest.raises(StageError, match="demo_medication_qa.xlsx: column 'Query' not found"):
        run_stage(workdir, "ingest")
    bad = workdir / "data/raw/bad.jsonl"
    bad.write_text('{"conversations": []}\n{"conversations": [oops]}\n')
    original = md5(bad)
    write_params(workdir, {"ingest": {"sources": [{"path": "data/raw/bad.jsonl", "format": "sharegpt"}]}})
    with pytest.raises(StageError, match="bad.jsonl: line 2, column 20: invalid JSON"):
        run_stage(workdir, "ingest")
    assert md5(bad) == original  # raw data untouched
