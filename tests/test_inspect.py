"""`tunepipe inspect FILE... [--json]`: the pipeline's ingest and clean code on files outside it."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, SHARED_DATA
from stages.cli import main

REQUIRED = {"file", "format", "encoding", "rows_read", "rows_kept", "rows_rejected", "rejected_by_reason"}


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults apply
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"conversations": [{"from": "human", "value": "阿司匹林是什么？"}, {"from": "gpt", "value": "一种解热镇痛药。"}]},
        {"conversations": [{"from": "human", "value": "阿司匹林是什么？"}, {"from": "gpt", "value": "一种解热镇痛药。"}]},
        {"conversations": [{"from": "human", "value": "布洛芬呢？"}, {"from": "gpt", "value": "无"}]},
        {"conversations": [{"from": "human", "value": "电话13812345678能问吗？"}, {"from": "gpt", "value": "可以。"}]},
    ]), encoding="utf-8")
    (tmp_path / "qa.csv").write_bytes("科室,标题,病人问题,医生回答\n内科,头痛,头痛怎么办？,多休息。\n内科,发热,发热怎么办？,多喝水。\n"
                                      .encode("gb18030"))
    return tmp_path


def test_json_report_has_the_promised_fields(files, capsys):
    code, out, _ = inspect(capsys, "chat.jsonl", "--json")
    assert code == 0
    (report,) = [json.loads(line) for line in out.splitlines()]
    assert REQUIRED <= set(report)
    assert report["format"] == "sharegpt" and report["encoding"] == "utf-8" and report["detected"] is True
    assert (report["rows_read"], report["rows_kept"], report["rows_rejected"]) == (4, 2, 2)
    assert report["rejected_by_reason"] == {"duplicate": 1, "placeholder_answer": 1}
    assert report["pii_redacted"] == {"mobile": 1}
    assert [p["row"] for p in report["problems"]] == [2, 3]
    assert len(report["samples"]) == 2 and report["samples"][0]["messages"][0]["content"] == "阿司匹林是什么？"


def test_text_report_and_flags(files, capsys):
    code, out, err = inspect(capsys, "qa.csv")
    assert code == 1 and "cannot tell which columns hold the question" in err  # Chinese headers not guessed
    code, out, _ = inspect(capsys, "qa.csv", "chat.jsonl", "--question", "病人问题", "--answer", "医生回答")
    assert code == 0
    assert "== qa.csv" in out and "encoding gb18030" in out and '"question":"病人问题"' in out
    assert "rows read 2 = kept 2 + rejected 0 (none)" in out
    assert "== chat.jsonl" in out and "rows read 4 = kept 2 + rejected 2 (duplicate 1, placeholder_answer 1)" in out
    assert "line 3: placeholder_answer: '无'" in out and "samples:" in out
    code, out, _ = inspect(capsys, "chat.jsonl", "--json", "-S", "clean.placeholder_answers=[]",
                           "-S", "clean.drop_duplicates=false")
    assert json.loads(out)["rejected_by_reason"] == {"near_duplicate": 1}  # an exact duplicate is a near one too


def test_params_of_the_pipeline_apply(files, capsys):
    (files / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"path": "qa.csv", "question": "病人问题", "answer": "医生回答", "meta": {"dept": "科室"}}]},
        "clean": {"exclude_keywords": ["发热"]}}, allow_unicode=True))
    code, out, _ = inspect(capsys, "qa.csv", "--json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "table"
    assert report["mapping"] == {"question": "病人问题", "answer": "医生回答", "meta": {"dept": "科室"}}
    assert report["rejected_by_reason"] == {"excluded_keyword": 1}
    code, _, err = inspect(capsys, "qa.csv", "-S", "clean.near_duplicates.action=merge")
    assert code == 1 and "clean.near_duplicates.action: Input should be 'drop' or 'group'" in err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_inspect_shared_files(capsys):
    files = [str(SHARED_DATA / f) for f in ("medication_qa/MedInfo2019-QA-Medications.xlsx",
                                            "chinese_medical_dialogue/neike_5000_6000_gb18030.csv",
                                            "medicalgpt/dpo_zh_500.jsonl")]
    code, out, _ = inspect(capsys, *files, "--json")
    medinfo, dialogue, dpo = (json.loads(line) for line in out.splitlines())
    assert code == 0
    assert (medinfo["format"], medinfo["rows_read"], medinfo["rejected_by_reason"]["placeholder_answer"]) == (
        "table", 690, 13)
    assert medinfo["conflicting_questions"] == 28
    assert (dialogue["encoding"], dialogue["rows_read"], dialogue["rejected_by_reason"]["duplicate"]) == (
        "gb18030", 7644, 396)
    # the repo's params: dpo off and clean.preference reject, so the pairs are rejected with their own reason
    assert (dpo["format"], dpo["rejected_by_reason"]) == ("preference", {"preference_without_dpo": 487,
                                                                         "replacement_char": 13})


def test_installed_command(files):
    exe = shutil.which("tunepipe", path=str(REPO / ".venvs/core/bin"))
    if exe is None:
        pytest.skip("the tunepipe command is not installed (./setup.sh installs it)")
    result = subprocess.run([exe, "inspect", "chat.jsonl", "--json"], cwd=files, capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["rows_read"] == 4
    result = subprocess.run([exe, "inspect", "missing.xlsx"], cwd=files, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "error: missing.xlsx: file not found\n"
