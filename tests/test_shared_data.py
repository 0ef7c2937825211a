"""Every real data set in ../shared/data through the pipeline's own ingest and clean code: exact
accounting (rows read = kept + rejected, per file) and each file's known problems caught
(../shared/data/README.md lists them). Read in place, never copied into the repo."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import SHARED_DATA, run_stage, write_params
from stages.clean import CleanParams, clean_records
from stages.common import read_jsonl
from stages.ingest import Source, open_source

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (real data sets are "
                                                                 "not part of the repository)")

MEDINFO = "medication_qa/MedInfo2019-QA-Medications.xlsx"
DIALOGUE = "chinese_medical_dialogue/neike_5000_6000_gb18030.csv"
SFT = "medicalgpt/medical_sft_1K_format.jsonl"
DPO = "medicalgpt/dpo_zh_500.jsonl"
FEVER = "medicalgpt/fever.txt"
TOOLS = "medicalgpt/glaive_toolcall_zh_demo.jsonl"
TOOLS_DPO = "medicalgpt/toolcall_dpo_zh_demo.jsonl"
RUOZHIBA = "coig_cqia/ruozhiba_ruozhiba.jsonl"
ALL = [MEDINFO, DIALOGUE, SFT, DPO, FEVER, TOOLS, TOOLS_DPO, RUOZHIBA]


def run(name: str, **clean):
    """Ingest (auto-detected) and clean one shared file with default params."""
    info, records = open_source(Source(path=str(SHARED_DATA / name)))
    records = list(records)
    result = clean_records(records, CleanParams(**clean))
    m = result["metrics"]
    assert m["rows_in"] == len(records) == info["rows"] == m["rows_kept"] + m["rows_rejected"]
    assert len(result["kept"]) == m["rows_kept"] and len(result["rejected"]) == m["rows_rejected"]
    assert sum(m["rejected_by_reason"].values()) == m["rows_rejected"]
    return info, records, result


def rejected_rows(result, reason: str) -> set[int]:
    return {r["source"]["row"] for r in result["rejected"] if r["reason"] == reason}


def test_medinfo_xlsx():
    info, records, result = run(MEDINFO)
    assert (info["container"], info["sheet"], info["format"]) == ("xlsx", "DrugQA", "table")
    assert info["mapping"]["question"] == "Question" and info["mapping"]["answer"] == "Answer"
    assert len(records) == 690
    m = result["metrics"]
    assert m["rejected_by_reason"] == {"duplicate": 1, "near_duplicate": 11, "placeholder_answer": 13}
    # the fully duplicated row; the answer pandas reads as NaN (the cell says "n/a"); "No answers"/"Unanswerable"
    assert rejected_rows(result, "duplicate") == {434}
    placeholders = {r["source"]["row"]: r["messages"][-1]["content"] for r in result["rejected"]
                    if r["reason"] == "placeholder_answer"}
    assert placeholders[214] == "n/a"
    assert sorted(set(placeholders.values())) == ["No Answers", "No answers", "Unanswerable", "n/a"]
    # 39 repeated questions, 28 of them with different answers: reported, kept (policy keep)
    assert m["conflicting_questions"] == 28
    kept_text = json.dumps([r["messages"] for r in result["kept"]], ensure_ascii=False)
    assert "\\t" not in kept_text and "\u00a0" not in kept_text  # \n\t lists and NBSP normalised
    assert "®" in kept_text and "“" in kept_text  # registered signs and curly quotes are text, kept
    assert m["lengths"]["answer_chars"]["max"] == 4322  # the longest answer is kept whole
    assert set(result["kept"][0]["meta"]) == {"Focus (Drug)", "Question Type", "Section Title", "URL"}


def test_chinese_dialogue_gb18030_csv():
    info, records, result = run(DIALOGUE)
    assert (info["container"], info["encoding"], info["format"]) == ("csv", "gb18030", "table")
    assert info["mapping"]["question"] == "ask" and info["mapping"]["answer"] == "answer"
    assert len(records) == 7644
    assert records[0]["messages"][0]["content"].startswith("我有高血压这两天女婿来的时候给我拿了些党参泡水喝")
    assert records[0]["meta"] == {"department": "心血管科", "title": "高血压患者能吃党参吗？"}
    # the 378 exact duplicate rows of the file are all rejected as duplicates (a few more rows differ
    # only in title or department, which are meta: the conversation is the same)
    with open(SHARED_DATA / DIALOGUE, encoding="gb18030", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        seen, exact = set(), set()
        start = 2
        for row in reader:
            if tuple(row) in seen:
                exact.add(start)
            seen.add(tuple(row))
            start = reader.line_num + 1
    assert len(exact) == 378
    duplicates = rejected_rows(result, "duplicate")
    assert exact <= duplicates and len(duplicates) == 396
    # the 6 asks that are just "无"
    assert len(rejected_rows(result, "placeholder_question")) == 6
    assert result["metrics"]["rejected_by_reason"] == {"duplicate": 396, "near_duplicate": 4, "placeholder_question": 6}


def test_medical_sft_sharegpt():
    info, records, result = run(SFT)
    assert info["format"] == "sharegpt" and len(records) == 1000
    # answers that start mid-sentence: "，..." (rows 2, 172, 316), ".", "：", "?", ")"
    cut = {r["source"]["row"] for r in records if r["messages"][-1]["content"].startswith(("，", ".", "：", "?", ")"))}
    assert {2, 172, 316, 251, 578, 801, 281, 889} == cut
    assert not any(r["messages"][-1]["content"].startswith(("，", ",", ".", "：", "?", ")")) for r in result["kept"])
    assert result["metrics"]["fixes"]["leading_punctuation"] == 8


def test_dpo_pairs_with_replacement_characters():
    info, records, result = run(DPO)
    assert info["format"] == "preference" and len(records) == 500
    assert all(r["rejected"]["role"] == "assistant" and r["messages"][-1]["role"] == "assistant" for r in records)
    assert sum(any(r["messages"][0]["role"] == "system" for _ in [0]) for r in records) == 84
    assert result["metrics"]["rejected_by_reason"] == {"replacement_char": 13}
    assert "\ufffd" not in json.dumps([r["messages"] for r in result["kept"]], ensure_ascii=False)
    stripped = run(DPO, replacement_char="strip")[2]["metrics"]
    assert stripped["rows_rejected"] == 0 and stripped["fixes"]["replacement_char_stripped"] == 13


def test_fever_corpus():
    info, records, result = run(FEVER)
    assert info["format"] == "text" and info["encoding"] == "utf-8"
    assert all(r["messages"] == [] and 0 < len(r["text"]) <= 2000 for r in records)
    lines = [line for line in (SHARED_DATA / FEVER).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert sum(r["text"].count("\n") + 1 for r in records) == len(lines)  # every line in exactly one chunk
    assert result["metrics"]["rows_rejected"] == 0


def test_glaive_tool_calls():
    info, records, result = run(TOOLS)
    assert info["format"] == "sharegpt" and len(records) == 300
    assert all(isinstance(r.get("tools"), list) for r in records if r.get("tools") is not None)
    calls = [m for r in records for m in r["messages"] if "tool_calls" in m]
    assert len(calls) == 216 and all(m["role"] == "assistant" and m["tool_calls"][0]["function"]["name"] for m in calls)
    assert sum(m["role"] == "tool" for r in records for m in r["messages"]) == 218
    assert result["metrics"]["rejected_by_reason"]["duplicate"] == 43


def test_toolcall_dpo_and_ruozhiba():
    info, records, result = run(TOOLS_DPO)
    assert info["format"] == "preference" and len(records) == 11 and all(r.get("tools") for r in records)
    assert result["kept"][0]["messages"][-1]["content"].startswith("Action: get_weather")
    info, records, result = run(RUOZHIBA)
    assert info["format"] == "alpaca" and len(records) == 240
    assert set(records[0]["meta"]) == {"task_type", "domain", "metadata", "answer_from", "human_verified", "copyright"}
    assert result["metrics"]["rows_kept"] == 240


def test_whole_pipeline_on_every_file(workdir):
    """The stages as dvc runs them: all eight files in, nothing lost between stages, no leakage."""
    sources = [{"path": str(SHARED_DATA / name)} for name in ALL]
    write_params(workdir, {"ingest": {"sources": sources},
                           "split": {"stratify": "source.file", "mix": [{"source": f"*{TOOLS}", "max_rows": 100}]}})
    for stage in ("ingest", "clean", "split"):
        run_stage(workdir, stage)
    ingest = json.loads((workdir / "metrics/ingest.json").read_text())
    clean = json.loads((workdir / "metrics/clean.json").read_text())
    split = json.loads((workdir / "metrics/split.json").read_text())
    assert ingest["rows_total"] == 10458 == clean["rows_in"]
    assert clean["rows_in"] == clean["rows_kept"] + clean["rows_rejected"]
    for path, n in ingest["rows_per_source"].items():
        s = clean["by_source"][path]
        assert s["rows_in"] == n == s["rows_kept"] + s["rows_rejected"]
    assert len(read_jsonl(workdir / "data/cleaned/rejected.jsonl")) == clean["rows_rejected"]
    parts = split["train_rows"] + split["val_rows"] + split["test_rows"] + split["corpus_rows"] + split["mixed_out_rows"]
    assert parts == clean["rows_kept"]
    assert split["leakage_rows"] == 0
    assert split["corpus_rows"] == 73 and split["mix"][f"*{TOOLS}"]["rows"] == 100
    assert (workdir / "plots/lengths.csv").read_text().startswith("chars,prompt,answer\n")
    conflicts = read_jsonl(workdir / "data/cleaned/conflicts.jsonl")
    assert len(conflicts) == clean["conflicting_questions"] > 28
