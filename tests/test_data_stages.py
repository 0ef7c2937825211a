"""demo_data, ingest, clean, split: exact counts on the demo data, and clear errors on bad input."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
import sys
import time

import orjson
import pytest
import yaml

from conftest import REPO, SHARED_DATA, run_stage, write_params
from stages.common import StageError, read_jsonl


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_demo_data_is_deterministic(workdir):
    # in two different seconds: openpyxl writes the wall clock into the workbook (docProps/core.xml)
    run_stage(workdir, "demo_data")
    first = {p.name: p.read_bytes() for p in (workdir / "data/raw").iterdir()}
    time.sleep(1.1)
    run_stage(workdir, "demo_data")
    assert {p.name: p.read_bytes() for p in (workdir / "data/raw").iterdir()} == first
    assert len(first) == 6  # xlsx, ShareGPT, fact sheets, mcq exam, tool calls, preference pairs


def test_ingest_reads_every_row(pipeline):
    records = read_jsonl(pipeline / "data/ingested/records.jsonl")
    metrics = json.loads((pipeline / "metrics/ingest.json").read_text())
    # 60 drugs x 5 question types + 3 duplicated rows in the sheet; one ShareGPT row, two preference
    # pairs (demo_data.preference_pairs) and one fact sheet (a text record for cpt) per drug; one exam
    # question per drug; 30 tool-calling conversations
    assert metrics["rows_per_source"] == {"data/raw/demo_medication_qa.xlsx": 303, "data/raw/demo_pharmacist_chat.jsonl": 60,
                                          "data/raw/demo_preferences.jsonl": 120, "data/raw/demo_drug_facts.txt": 60,
                                          "data/raw/demo_drug_exam.txt": 60, "data/raw/demo_tool_calls.jsonl": 30}
    assert len(records) == 633
    assert sum("mcq" in r for r in records) == 60 and sum("tools" in r for r in records) == 30
    sheet_row = records[0]
    assert sheet_row["source"] == {"file": "data/raw/demo_medication_qa.xlsx", "row": 2}
    assert [m["role"] for m in sheet_row["messages"]] == ["system", "user", "assistant"]
    assert set(sheet_row["meta"]) == {"drug", "question_type"}
    chat_row = records[303]
    assert [m["role"] for m in chat_row["messages"]] == ["system", "user", "assistant"]


def test_clean_accounts_for_every_row(pipeline):
    metrics = json.loads((pipeline / "metrics/clean.json").read_text())
    # dpo is off and params.yaml has clean.preference: reject, so the demo's pairs are rejected;
    # the near-duplicate: two exam questions on drugs with similar names and the same options
    assert metrics["rejected_by_reason"] == {"duplicate": 3, "empty_turn": 1, "near_duplicate": 1, "placeholder_answer": 4,
                                             "preference_without_dpo": 120}
    assert metrics["rows_in"] == metrics["rows_kept"] + metrics["rows_rejected"] == 633
    kept = read_jsonl(pipeline / "data/cleaned/records.jsonl")
    rejected = read_jsonl(pipeline / "data/cleaned/rejected.jsonl")
    assert len(kept) == 504 and len(rejected) == 129
    assert sum("mcq" in r for r in kept) == 59  # passed through with their options and answer
    assert all(r["reason"] for r in rejected)
    assert len({r["id"] for r in kept}) == len(kept)
    text = json.dumps(kept, ensure_ascii=False)
    assert "\u00a0" not in text and "  " not in text  # NBSP and doubled spaces normalised away
    placeholders = [r["messages"][-1]["content"] for r in rejected if r["reason"] == "placeholder_answer"]
    assert sorted(placeholders) == ["No answers", "No answers", "Unanswerable", "Unanswerable"]


def test_split_is_seeded_and_leak_free(pipeline, workdir):
    metrics = json.loads((pipeline / "metrics/split.json").read_text())
    assert {k: metrics[k] for k in ("train_rows", "val_rows", "test_rows", "leakage_rows")} == {
        "train_rows": 283, "val_rows": 36, "test_rows": 125, "leakage_rows": 0}
    # split.held_out: the exam and tool-calling sources are scored in test, never trained on
    assert metrics["held_out_rows"] == 59 + 30
    assert {s: n for s, n in metrics["rows_per_source"]["test"].items() if "exam" in s or "tool" in s} == {
        "data/raw/demo_drug_exam.txt": 59, "data/raw/demo_tool_calls.jsonl": 30}
    assert not any("exam" in s or "tool" in s for s in metrics["rows_per_source"]["train"])
    assert metrics["corpus_rows"] == 60 and metrics["mixed_out_rows"] == 0
    assert metrics["preference_train_rows"] == metrics["preference_test_rows"] == 0  # dpo off
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


# ----------------------------------------------------------------------------------------------
# formats and containers
# ----------------------------------------------------------------------------------------------
from stages.clean import CleanParams, clean_records  # noqa: E402
from stages.clean_dedup import minhash_signatures, ngram_hash32  # noqa: E402
from stages.clean_text import TextFixer  # noqa: E402
from stages.ingest import Source, open_source  # noqa: E402


def ingest_one(path: Path, **source) -> tuple[dict, list[dict]]:
    info, records = open_source(Source(path=str(path), **source))
    return info, list(records)


def chat(q: str, a: str, row: int = 1, file: str = "t.jsonl", **extra) -> dict:
    return {"id": "", "source": {"file": file, "row": row}, "meta": {},
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def test_json_formats_are_detected(tmp_path):
    rows = {
        "alpaca.json": ("alpaca", '[{"instruction": "Translate", "input": "猫", "output": "cat", '
                                  '"history": [["hi", "hello"]], "topic": "zh"}]'),
        "openai.jsonl": ("messages", json.dumps({"messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "content": "{\"c\": 21}"}, {"role": "assistant", "content": "21 C"}],
            "tools": [{"name": "weather", "parameters": {}}]})),
        "xtuner.json": ("xtuner", json.dumps({"conversation": [{"system": "s", "input": "q1", "output": "a1"},
                                                               {"input": "q2", "output": "a2"}]})),  # JSONL in .json
        "pairs.jsonl": ("preference", json.dumps({"question": "q", "chosen": [{"role": "assistant", "content": "good"}],
                                                  "rejected": "bad"})),
        "qa.json": ("table", '{"data": [{"query": "q", "response": "a"}, {"query": "q2", "response": "a2"}]}'),
        "corpus.jsonl": ("text", json.dumps({"text": "continued pretraining text"})),
    }
    for name, (fmt, text) in rows.items():
        (tmp_path / name).write_text(text + "\n", encoding="utf-8")
        info, records = ingest_one(tmp_path / name)
        assert (info["format"], info["detected"]) == (fmt, True), name
        assert records and all(r["id"] and r["source"]["file"] == str(tmp_path / name) for r in records)
    _, (alpaca,) = ingest_one(tmp_path / "alpaca.json")
    assert [m["content"] for m in alpaca["messages"]] == ["hi", "hello", "Translate\n\n猫", "cat"]
    assert alpaca["meta"] == {"topic": "zh"} and alpaca["source"]["row"] == 1
    _, (openai,) = ingest_one(tmp_path / "openai.jsonl")
    assert [m["role"] for m in openai["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert openai["messages"][2]["tool_calls"][0]["function"]["name"] == "weather"
    assert json.loads(openai["messages"][2]["content"])[0]["name"] == "weather"  # the call is rendered text too
    assert openai["tools"] == [{"name": "weather", "parameters": {}}]
    _, (xt,) = ingest_one(tmp_path / "xtuner.json")
    assert [m["role"] for m in xt["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    _, (pair,) = ingest_one(tmp_path / "pairs.jsonl")
    assert pair["messages"][-1]["content"] == "good" and pair["rejected"] == {"role": "assistant", "content": "bad"}
    info, qa = ingest_one(tmp_path / "qa.json")
    assert info["mapping"] == {"question": "query", "answer": "response"} and len(qa) == 2
    _, (text,) = ingest_one(tmp_path / "corpus.jsonl")
    assert text["messages"] == [] and text["text"] == "continued pretraining text"
    # renamed keys and a meta mapping from params
    (tmp_path / "renamed.jsonl").write_text(json.dumps({"dialog": [{"speaker": "human", "text": "q"},
                                                                   {"speaker": "gpt", "text": "a"}], "lang": "en"}) + "\n")
    info, (renamed,) = ingest_one(tmp_path / "renamed.jsonl", format="sharegpt", meta={"language": "lang"},
                                  fields={"conversations": "dialog", "from": "speaker", "value": "text"})
    assert [m["content"] for m in renamed["messages"]] == ["q", "a"] and renamed["meta"] == {"language": "en"}


@pytest.mark.parametrize("encoding, expected", [("utf-8-sig", "utf-8-sig"), ("gbk", "gb18030"), ("utf-16", "utf-16"),
                                                ("utf-8", "utf-8")])
def test_csv_encodings_are_detected(tmp_path, encoding, expected):
    rows = [("问题", "回答", "科室")] + [(f"高血压患者能吃党参吗？第{i}次提问", f"高血压病人可以口服党参的，第{i}个回答。", "心血管科")
                                     for i in range(40)]
    text = "\r\n".join(",".join(r) for r in rows) + "\r\n"
    (tmp_path / "qa.csv").write_bytes(text.encode(encoding))
    info, records = ingest_one(tmp_path / "qa.csv")
    assert info["encoding"] == expected
    assert info["mapping"] == {"question": "问题", "answer": "回答", "meta": ["科室"]}
    assert records[0]["messages"][0]["content"] == "高血压患者能吃党参吗？第0次提问"
    assert records[0]["meta"] == {"科室": "心血管科"} and records[0]["source"]["row"] == 2


def test_tsv_multiline_cells_and_sheet_index(tmp_path):
    (tmp_path / "qa.tsv").write_text('question\tanswer\nq1\t"line one\nline two"\nq2\ta2\n')
    _, records = ingest_one(tmp_path / "qa.tsv")
    assert [r["source"]["row"] for r in records] == [2, 4]  # the line each row starts at
    assert records[0]["messages"][1]["content"] == "line one\nline two"
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.title = "cover"
    wb.active.append(["nothing here"])
    ws = wb.create_sheet("qa")
    for row in (["Prompt", "Completion", "n"], ["q", "a", 3], [None, None, None], ["q2", 4.0, 5.5]):
        ws.append(row)
    wb.save(tmp_path / "qa.xlsx")
    info, records = ingest_one(tmp_path / "qa.xlsx", sheet=1)
    assert info["sheet"] == "qa" and info["mapping"]["question"] == "Prompt" and info["blank_rows"] == 1
    assert [(r["source"]["row"], r["messages"][1]["content"], r["meta"]) for r in records] == [
        (2, "a", {"n": "3"}), (4, "4", {"n": "5.5"})]


def test_docx_exam_paper(tmp_path):
    import docx

    document = docx.Document()
    for text in ["2023年公务员考试模拟卷", "一、单项选择题", "1. 下列哪项属于法律行为？（  ）", "A. 签订合同", "B. 散步",
                 "答案：A", "解析：签订合同产生法律后果。", "1. 合同是民事法律行为", "2、我国的根本大法是什么？", "【参考答案】宪法",
                 "二、申论", "第3题 请概括材料中的主要问题。", "4. 没有答案的题"]:
        document.add_paragraph(text)
    document.save(tmp_path / "exam.docx")
    info, records = ingest_one(tmp_path / "exam.docx")
    assert info["format"] == "exam"
    assert [r["source"]["row"] for r in records] == [3, 9, 12, 13]  # paragraph each question starts at
    first = records[0]["messages"]
    assert first[0]["content"] == "下列哪项属于法律行为？（  ）\nA. 签订合同\nB. 散步"
    assert first[1]["content"] == "A\n解析：签订合同产生法律后果。\n1. 合同是民事法律行为"  # a list, not question 1
    assert records[1]["messages"][1]["content"] == "宪法" and records[1]["meta"] == {"section": "一、单项选择题"}
    assert records[2]["meta"] == {"section": "二、申论"} and records[3]["messages"][1]["content"] == ""
    assert clean_records(records, CleanParams())["metrics"]["rejected_by_reason"] == {"empty_turn": 2}


def test_text_corpus_chunks(tmp_path):
    (tmp_path / "corpus.txt").write_text("第一章\n" + "发热是常见症状。\n" * 30 + "\n第二章\n短。\n", encoding="utf-8")
    _, records = ingest_one(tmp_path / "corpus.txt", chunk_chars=100)
    assert all(len(r["text"]) <= 100 for r in records)
    assert [r["source"]["row"] for r in records][0] == 1 and records[-1]["text"] == "第二章\n短。"
    assert sum(r["text"].count("发热") for r in records) == 30


# ----------------------------------------------------------------------------------------------
# clean: text fixes and rules, each switchable and counted
# ----------------------------------------------------------------------------------------------
def test_text_fixes():
    fix = TextFixer(CleanParams())
    assert fix.text("ＡＢＣ１２３\u3000问题，答案：（是）①\u00a0m² ½") == "ABC123 问题，答案：（是）① m² ½"
    assert fix.text("cafÃ© â€œquotedâ€\x9d") == "café “quoted”"
    assert fix.text("<p>Take <b>one</b> tablet</p><br/>daily &amp; rest") == "Take one tablet\n\ndaily & rest"
    assert fix.text("if a < b and c > d, <I.0, TBi1>") == "if a < b and c > d, <I.0, TBi1>"
    assert fix.text("，与走路姿势没有关系") == "与走路姿势没有关系" and fix.text("...and so on") == "...and so on"
    assert fix.text("  two  spaces\t\there \n\n\n\nnext\u200b line  ") == "two spaces here\n\nnext line"
    assert set(fix.fixes) == {"unicode", "mojibake", "html", "leading_punctuation", "whitespace"}
    off = TextFixer(CleanParams(normalize_unicode=False, fix_mojibake=False, strip_html=False, collapse_whitespace=False,
                                strip_leading_punctuation=False, pii={"enabled": False}))
    raw = "，<b>cafÃ©</b>\u3000 ＡＢ  a@b.com"
    assert off.text(raw) == raw and not off.fixes


def test_pii_redaction():
    fix = TextFixer(CleanParams())
    text = ("电话13812345678，+86 139-1234-5678，座机010-12345678，邮箱 zhang.san@example.com，"
            "身份证11010519491231002X，卡号6222021234567890128；订单号11010519491231002 和 1234567890123456 不是")
    assert fix.text(text) == ("电话[PHONE]，[PHONE]，座机[PHONE]，邮箱 [EMAIL]，身份证[ID_CARD]，卡号[BANK_CARD]；"
                              "订单号11010519491231002 和 1234567890123456 不是")
    assert fix.redactions == {"mobile": 2, "landline": 1, "email": 1, "id_card": 1, "bank_card": 1}
    only_email = TextFixer(CleanParams(pii={"kinds": ["email"]}))
    assert only_email.text("13812345678 a@b.cn") == "13812345678 [EMAIL]"
    result = clean_records([chat("call me at 13812345678", "ok")], CleanParams(pii={"action": "reject"}))
    assert result["metrics"]["rejected_by_reason"] == {"pii": 1}


TRICKY_TEXTS = [
    "plain text", "中文问题，答案：（是）①", "ＡＢＣ", "a\u3000b", "x\u00a0y", "cafÃ©", "e\u0301", "한\u1161", "Ω", "ﬁ",
    "<p>x</p>", "a &amp; b", "a < b", "q\ufffd", "  lead", "trail ", "a  b", "a \nb", "a\n b", "a\n\n\nb", "\tx",
    "x\r\ny", "zero\u200bwidth", "，开头", "...and", ") x", "call 13812345678", "mail a@b.cn", "1234 5678", "😀 emoji",
    "𝐀 bold", "x\x1cy", "end\u2028", "١٢٣", "\ufeffbom", "²", "½", "x\x85y", "Straße", "ǅ"]


@pytest.mark.parametrize("changes", [{}, {"keep_cjk_punctuation": False}, {"replacement_char": "strip"},
                                     {"normalize_unicode": False, "pii": {"enabled": False}}])
def test_texts_skipping_the_python_fixes_need_none(changes):
    """clean runs TextFixer only on texts that may_need_fixing's regex matches: every text a fix
    changes must match it (tricky texts, and the shared data's questions and answers where present)."""
    import polars as pl

    from stages.clean_text import may_need_fixing

    texts = list(TRICKY_TEXTS)
    medical = SHARED_DATA / "chinese_medical_dialogue/neike_5000_6000_gb18030.csv"
    if medical.exists():
        texts += [t for line in medical.read_text(encoding="gb18030").splitlines()[:3000] for t in line.split(",")]
    p = CleanParams(**changes)
    fixer, pattern = TextFixer(p), may_need_fixing(p)
    matched = pl.Series(texts).str.contains(pattern).to_list()
    changed = [t for t in texts if fixer.text(t) != t]
    assert len(changed) >= (25 if medical.exists() else 15)  # the tricky texts alone: 20
    assert [t for t, m in zip(texts, matched) if not m and fixer.text(t) != t] == []


RULE_ROWS = [
    ("replacement_char", chat("q\ufffd", "a"), {"replacement_char": "keep"}),
    ("no_user_assistant_pair", {**chat("q", "a"), "messages": [{"role": "user", "content": "q"}]}, None),
    ("empty_turn", chat("q", ""), None),
    ("placeholder_answer", chat("q", "Unanswerable."), {"placeholder_answers": []}),
    ("placeholder_question", chat("无", "an answer"), {"placeholder_questions": False}),
    ("too_short", chat("q", "a"), {"min_chars": 0}),
    ("too_long", chat("q" * 50, "a" * 60), {"max_chars": None}),
    ("answer_too_short", chat("q", "ab"), {"min_answer_chars": 0}),
    ("excluded_keyword", chat("buy CRYPTO now", "no"), {"exclude_keywords": []}),
    ("off_domain", chat("stock prices?", "up"), {"include_keywords": []}),
    ("identical_pair", {**chat("q", "same"), "rejected": {"role": "assistant", "content": "same"}}, None),
]


@pytest.mark.parametrize("reason, record, off", RULE_ROWS, ids=[r[0] for r in RULE_ROWS])
def test_each_rule_is_counted_and_switchable(reason, record, off):
    on = {"min_chars": 3, "max_chars": 100, "min_answer_chars": 3 if reason == "answer_too_short" else 0,
          "exclude_keywords": ["crypto"], "include_keywords": ["weather"] if reason == "off_domain" else []}
    fine = chat("weather today?", "sunny and warm", row=2)
    result = clean_records([record, fine], CleanParams(**on))
    assert result["metrics"]["rejected_by_reason"] == {reason: 1}
    assert result["rejected"][0]["reason"] == reason and result["rejected"][0]["source"]["row"] == 1
    if off is not None:
        assert clean_records([record, fine], CleanParams(**{**on, **off}))["metrics"]["rows_rejected"] == 0


def test_duplicates_near_duplicates_and_conflicts():
    base = ("Ibuprofen is a nonsteroidal anti-inflammatory drug used to relieve pain, fever and inflammation. "
            "Take it with food or milk to prevent stomach upset, and do not take more than directed on the label.")
    rows = [chat("What is ibuprofen?", base, 1), chat("what is  ibuprofen?", base, 2),  # exact after normalising
            chat("what is ibuprofen", base.replace("fever and", "fever, and"), 3),          # near
            chat("What is ibuprofen?", "A painkiller.", 4),                               # conflicting answer
            chat("What is pelranva used for?", "Pelranva is a pain reliever used to treat mild to moderate pain.", 5),
            chat("What is peltinva used for?", "Peltinva is a pain reliever used to treat mild to moderate pain.", 6)]
    result = clean_records(rows, CleanParams())
    assert {r["source"]["row"]: r["reason"] for r in result["rejected"]} == {2: "duplicate", 3: "near_duplicate"}
    assert result["rejected"][0]["duplicate_of"] == {"file": "t.jsonl", "row": 1}
    assert [r["source"]["row"] for r in result["kept"]] == [1, 4, 5, 6]  # templated rows of two drugs differ
    assert result["metrics"]["conflicting_questions"] == 1
    assert [x["row"] for x in result["conflicts"][0]["rows"]] == [1, 4]
    grouped = clean_records(rows, CleanParams(near_duplicates={"action": "group"}, conflicting_answers="keep_first"))
    assert {r["source"]["row"]: r["reason"] for r in grouped["rejected"]} == {2: "duplicate", 4: "conflicting_answer"}
    kept = {r["source"]["row"]: r for r in grouped["kept"]}
    assert kept[1]["group"] == kept[3]["group"] == kept[1]["id"] and "group" not in kept[5]
    dropped = clean_records(rows, CleanParams(drop_duplicates=False, near_duplicates={"enabled": False},
                                              conflicting_answers="drop"))
    assert dropped["metrics"]["rejected_by_reason"] == {"conflicting_answer": 3}  # rows 1, 2 and 4




def test_tools_are_part_of_the_duplicate_key():
    """The same conversation offering other tools is another record; offering the same ones, a duplicate."""
    weather = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    clock = [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}]
    rows = [chat("What time is it?", "Let me check.", 1, tools=weather), chat("What time is it?", "Let me check.", 2, tools=clock),
            chat("What time is it?", "Let me check.", 3, tools=weather), chat("What time is it?", "Let me check.", 4)]
    result = clean_records(rows, CleanParams(near_duplicates={"enabled": False}))
    assert {r["source"]["row"]: r["reason"] for r in result["rejected"]} == {3: "duplicate"}
    assert [r["source"]["row"] for r in result["kept"]] == [1, 2, 4]

@pytest.mark.parametrize("order", ["source first", "messages first", "nested messages key first"])
def test_reports_name_sources_whatever_the_key_order(order):
    """clean parses only a line's start for a source that comes before the messages (as ingest
    writes records); any other layout must give the same sources."""
    rows = [chat("What is ibuprofen?", "A painkiller.", 1), chat("what is ibuprofen?", "a painkiller.", 2),
            chat("What is ibuprofen?", "An NSAID.", 3)]
    if order == "messages first":
        rows = [{"messages": r["messages"], "meta": {"source": {"file": "wrong"}}, "id": "", "source": r["source"]} for r in rows]
    elif order == "nested messages key first":
        rows = [{"id": "", "meta": {"messages": [], "source": {"file": "wrong"}}, "source": r["source"], "messages": r["messages"]}
                for r in rows]
    result = clean_records(rows, CleanParams())
    assert [r["duplicate_of"] for r in result["rejected"]] == [{"file": "t.jsonl", "row": 1}]
    assert result["conflicts"] == [{"question": "what is ibuprofen?", "rows": [
        {"file": "t.jsonl", "row": 1, "id": "", "answer": "A painkiller."}, {"file": "t.jsonl", "row": 3, "id": "", "answer": "An NSAID."}]}]

def test_minhash_signatures_are_datasketchs():
    from datasketch import MinHash

    import pyarrow as pa

    texts = ["高血压患者能吃党参吗？我有高血压", "What is ibuprofen used for?", "abc", "", "abcdefgh" * 20, "café 😀 naïve"]
    sigs = minhash_signatures(texts, ngram=5, num_perm=32, seed=3)
    # a slice of a larger Arrow array (as clean passes the kept rows' texts): the same signatures
    assert (minhash_signatures(pa.array(["x"] + texts)[1:], ngram=5, num_perm=32, seed=3) == sigs).all()
    for text, sig in zip(texts, sigs):
        m = MinHash(num_perm=32, seed=3, scheme="affine32", hashfunc=ngram_hash32)
        grams = [text[i:i + 5] for i in range(len(text) - 4)] if len(text) >= 5 else ([text] if text else [])
        m.update_batch([g.encode("utf-8") for g in grams])
        assert list(sig) == list(m.hashvalues), text




def test_lower_cased_is_polars_lowercase_for_every_character():
    import polars as pl

    from stages.clean_checks import lower_cased

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = pl.Series(chars + ["ΟΔΟΣ ΟΔΟΣ", "İstanbul", "高血压 ABC", "无", None, ""])  # final sigma, a two-character lowering
    assert lower_cased(texts).equals(texts.str.to_lowercase())
    assert lower_cased(pl.Series(["高血压", None])).to_list() == ["高血压", None]

def test_exact_jaccard_is_that_of_the_ngram_sets():
    import numpy as np

    from stages.clean_dedup import jaccard_into, utf8_buffers

    def grams(text: str) -> set[str]:
        return {text[i:i + 5] for i in range(len(text) - 4)} if len(text) >= 5 else {text}

    texts = ["高血压患者能吃党参吗？我有高血压", "高血压患者能吃党参吗？我有低血压", "abcabcabcabcabc", "abcabcabcabcabd",
             "What is ibuprofen used for?", "what is ibuprofen used for??", "abc", "abc", "café 😀 naïve", "cafe 😀 naive"]
    left, right = np.array([0, 0, 0, 2, 4, 6, 8]), np.array([1, 2, 4, 3, 5, 7, 9])
    out = np.zeros(len(left))
    data, offsets = utf8_buffers(texts)
    jaccard_into(data, offsets, 5, left, right, np.array([0, 3, 4, 5, 6, 7]), out)  # pairs grouped by left
    expected = [len(grams(texts[i]) & grams(texts[j])) / len(grams(texts[i]) | grams(texts[j])) for i, j in zip(left, right)]
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    assert {0.0, 1.0} < set(expected)  # disjoint, equal and partly shared sets

def test_token_bounds_use_the_base_tokenizer(pipeline):
    rows = [chat("What is aspirin?", "A pain reliever. " * 40, 1), chat("What is aspirin for?", "Pain.", 2)]
    result = clean_records(rows, CleanParams(max_tokens=60, min_tokens=4, tokenizer=str(pipeline / "models/base")))
    assert result["metrics"]["rejected_by_reason"] == {"too_many_tokens": 1}
    with pytest.raises(StageError, match="no base model manifest"):
        clean_records(rows, CleanParams(max_tokens=60, tokenizer=str(pipeline / "nowhere")))


def test_clean_writes_the_data_card(pipeline):
    metrics = json.loads((pipeline / "metrics/clean.json").read_text())
    assert metrics["by_source"]["data/raw/demo_medication_qa.xlsx"] == {
        "rows_in": 303, "rows_kept": 295, "rows_rejected": 8,
        "rejected_by_reason": {"duplicate": 3, "empty_turn": 1, "placeholder_answer": 4}}
    assert metrics["by_source"]["data/raw/demo_pharmacist_chat.jsonl"]["rows_kept"] == 60
    lines = (pipeline / "plots/lengths.csv").read_text().splitlines()
    assert lines[0] == "chars,prompt,answer"
    assert sum(int(line.split(",")[2]) for line in lines[1:]) == metrics["rows_kept"] == 504  # fact sheets too
    assert (pipeline / "data/cleaned/conflicts.jsonl").exists() and (pipeline / "data/judge/cache.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# split: groups, strata, mixing
# ----------------------------------------------------------------------------------------------
def split_rows(workdir, records: list[dict], **params) -> dict:
    from stages.records import record_id, write_records

    for r in records:
        r["id"] = r["id"] or record_id(r)
    write_records(workdir / "data/cleaned/records.jsonl", records)
    write_params(workdir, {"split": params})
    run_stage(workdir, "split")
    return {name: read_jsonl(workdir / f"data/split/{name}.jsonl")
            for name in ("train", "val", "test", "corpus", "mixed_out")}


def test_split_keeps_groups_together_and_mixes(workdir):
    records = []
    for i in range(200):
        r = chat(f"question {i}?", f"answer {i}", i, file="qa.jsonl", meta={"kind": "a" if i % 4 else "b"})
        if i % 10 < 3:  # near-duplicate groups of three different prompts each
            r["group"] = f"g{i // 10}"
        records.append(r)
    records += [chat(f"call tool {i}", f"done {i}", i, file="tools.jsonl", meta={"kind": "t"}) for i in range(100)]
    records.append({"id": "", "source": {"file": "c.txt", "row": 1}, "messages": [], "meta": {}, "text": "corpus"})
    parts = split_rows(workdir, records, stratify="meta.kind", mix=[{"source": "tools*", "share": 0.1}])
    metrics = json.loads((workdir / "metrics/split.json").read_text())
    assert metrics["leakage_rows"] == 0 and metrics["corpus_rows"] == 1
    assert metrics["mix"]["tools*"]["rows"] == 22 and metrics["mixed_out_rows"] == 78  # 22 / 222 = 10%
    assert sum(len(v) for v in parts.values()) == len(records)
    where = {r["group"]: name for name in ("train", "val", "test") for r in parts[name] if r.get("group")}
    for name in ("train", "val", "test"):
        assert all(where[r["group"]] == name for r in parts[name] if r.get("group"))
    assert set(metrics["strata"]) == {"a", "b", "t"}
    for kind in "ab":  # each stratum split by the ratios
        n = sum(r["meta"]["kind"] == kind for name in ("train", "val", "test") for r in parts[name])
        assert abs(sum(r["meta"]["kind"] == kind for r in parts["test"]) - 0.1 * n) <= 3
    capped = split_rows(workdir, records, mix=[{"source": "tools.jsonl", "max_rows": 5}])
    assert sum(r["source"]["file"] == "tools.jsonl" for n in ("train", "val", "test") for r in capped[n]) == 5


def test_xtuner_format_of_tool_conversations(workdir):
    from stages.split import to_xtuner

    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"},
                           {"role": "assistant", "content": '{"name": "w"}', "tool_calls": []},
                           {"role": "tool", "content": "21C"}, {"role": "assistant", "content": "It is 21C."}]}
    assert to_xtuner(record) == {"conversation": [{"system": "s", "input": "weather?", "output": '{"name": "w"}'},
                                                  {"input": "21C", "output": "It is 21C."}]}


def test_xtuner_lines_are_orjson_dumps_of_to_xtuner(tmp_path):
    """split builds xtuner's lines column-wise (polars writes the JSON), to_xtuner only for unusual
    conversations: each line is byte for byte orjson.dumps(to_xtuner(record))."""
    import numpy as np

    from stages.records import write_records
    from stages.split import Rows, to_xtuner

    def m(role: str, content: str, **extra) -> dict:
        return {"role": role, "content": content, **extra}

    tricky = ["", 'say "hi"', "back\\slash \\u0041", "ctl \x00\x01\x08\t\n\x0b\x0c\r\x1f \x7f", "\u2028\u2029 😀 𝄞",
              "中文，全角！", "</script>", "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)]
    conversations = [[m("user", q), m("assistant", a)] for q, a in zip(tricky, reversed(tricky))] + [
        [m("system", "be brief " + tricky[3]), m("user", "q"), m("assistant", "a"), m("user", "q2"), m("assistant", "a2")],
        [m("system", ""), m("user", "q"), m("assistant", "a")],  # an empty system prompt: no "system" key
        [m("system", "s")], [],  # no exchange at all
        [m("user", "weather?"), m("assistant", '{"name": "w"}', tool_calls=[{"name": "w", "arguments": {}}]),
         m("tool", "21C"), m("assistant", "It is 21C.")],
        [m("system", "s"), m("user", "a"), m("user", "b"), m("assistant", "c")],  # consecutive user turns
        [m("assistant", "hi"), m("user", "q"), m("assistant", "a")],
        [m("user", "q"), m("assistant", "a"), m("user", "dangling")],
        [m("user", "q"), m("system", "late"), m("assistant", "a")],
        [m("system", "s1"), m("system", "s2"), m("user", "q"), m("assistant", "a")]]
    records = [{"id": str(n), "source": {"file": "t.jsonl", "row": n}, "messages": c, "meta": {}}
               for n, c in enumerate(conversations)]
    records.append({"id": "t", "source": {"file": "c.txt", "row": 1}, "messages": [], "meta": {}, "text": "a chunk"})
    write_records(tmp_path / "records.jsonl", records)
    lines = Rows(str(tmp_path / "records.jsonl"), None).xtuner(np.arange(len(records))).to_pylist()
    assert lines == [orjson.dumps(to_xtuner(r)).decode() + "\n" for r in records]


def test_split_ranks_prompt_keys_as_python_orders_them(tmp_path):
    """split compares prompt keys (records.prompt_key: str.casefold) and group names by their ranks
    in sorted order: the same ranks as Python's sort gives the strings."""
    import polars as pl

    from stages.records import prompt_key, write_records
    from stages.split import Rows, casefolded

    texts = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000] + ["Straße ΣΑΣ", "İstanbul ǅ ﬁ"]
    assert casefolded(pl.Series(texts)).to_list() == [t.casefold() for t in texts]

    prompts = ["b", "B", "a", "", "ß", "SS", "ss", "Straße", "STRASSE", "ǅ", "ǆ", "Σ", "σ", "ς", "İ", "i̇", "ﬁ", "FI",
               "\x00", "\x00group\x00g", "😀", "\uffff", "\U0010ffff", "é", "É", "ꭰ", "Ꭰ", "中", "a\nb", "A\nB"]
    records = [chat(q, "answer", n, group="g" if n % 3 else "") for n, q in enumerate(prompts)]
    records[-1]["messages"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                               {"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]
    records.append({"id": "", "source": {"file": "c.txt", "row": 1}, "messages": [], "meta": {}, "text": "Corpus"})
    write_records(tmp_path / "records.jsonl", records)
    rows = Rows(str(tmp_path / "records.jsonl"), None)
    names = [prompt_key(r) for r in records[:-1]] + ["\x00group\x00" + r["group"] for r in records if r.get("group")]
    ranks = rows.prompt[:-1].tolist() + rows.group[rows.group >= 0].tolist()
    assert ranks == [sorted(set(names)).index(name) for name in names]
    assert rows.prompt[-1] == -1 and rows.group[-1] == -1 and rows.chat.tolist() == [True] * len(prompts) + [False]


def test_split_strata_of_fields_that_are_not_text(workdir):
    """A stratify field that is a number, a boolean, an object or missing: its str(), as split.field has it."""
    from collections import Counter

    from stages.split import field

    values = [1, 2.50, True, None, "x", {"a": 1}, [1], "missing"]
    records = [chat(f"question {i}?", f"answer {i}", i, meta={} if values[i % 8] == "missing" else {"level": values[i % 8]})
               for i in range(160)]
    split_rows(workdir, records, stratify="meta.level")
    metrics = json.loads((workdir / "metrics/split.json").read_text())
    assert metrics["strata"] == dict(sorted(Counter(field(r, "meta.level") for r in records).items()))
    assert set(metrics["strata"]) == {"1", "2.5", "True", "None", "x", "{'a': 1}", "[1]"}
    for r in records:
        r["meta"]["kind"] = None if r["source"]["row"] % 4 == 0 else "k"  # text, or null: "None"
    split_rows(workdir, records, stratify="meta.kind")
    assert json.loads((workdir / "metrics/split.json").read_text())["strata"] == {"None": 40, "k": 120}


# ----------------------------------------------------------------------------------------------
# the LLM judge, against a small OpenAI-compatible server of our own
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def judge_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = body["messages"][0]["content"]
            score = "2" if "BAD-ANSWER" in prompt else "Score: 9"
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": score}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_llm_judge_scores_and_caches(tmp_path, judge_server, monkeypatch):
    url, seen = judge_server
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    rows = [chat("What is aspirin?", "A pain reliever.", 1), chat("What is ibuprofen?", "BAD-ANSWER", 2),
            chat("What is paracetamol?", "A fever reducer.", 3)]
    p = CleanParams(judge={"enabled": True, "url": url, "model": "judge-7b", "api_key_env": "JUDGE_KEY", "min_score": 5})
    cache = tmp_path / "judge/cache.jsonl"
    result = clean_records(rows, p, cache)
    assert result["metrics"]["rejected_by_reason"] == {"judge_low_score": 1}
    assert result["rejected"][0]["source"]["row"] == 2 and result["rejected"][0]["judge_score"] == 2.0
    assert [r["judge_score"] for r in result["kept"]] == [9.0, 9.0]
    assert result["metrics"]["judge"] == {"cached": 0, "requests": 3, "unparseable": 0}
    assert len(seen) == 3 and {(s["path"], s["auth"], s["body"]["model"]) for s in seen} == {
        ("/v1/chat/completions", "Bearer sk-test", "judge-7b")}  # requests run in parallel, in any order
    assert any("What is aspirin?" in s["body"]["messages"][0]["content"] for s in seen)
    assert len(read_jsonl(cache)) == 3
    again = clean_records(rows + [chat("What is codeine?", "An opioid.", 4)], p, cache)  # a rerun: only the new row
    assert again["metrics"]["judge"] == {"cached": 3, "requests": 1, "unparseable": 0} and len(seen) == 4
    with pytest.raises(StageError, match="clean.judge: http://127.0.0.1:9/v1/chat/completions unreachable"):
        clean_records(rows, CleanParams(judge={**p.judge.model_dump(), "url": "http://127.0.0.1:9/v1", "retries": 0}),
                      tmp_path / "other.jsonl")


def test_alpaca_sheet_and_one_workbook_listed_twice(workdir):
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.title = "train"
    for row in (["Instruction", "Input", "Output"], ["Translate", "猫", "cat"]):
        wb.active.append(row)
    other = wb.create_sheet("extra")
    for row in (["Instruction", "Input", "Output"], ["Translate", "狗", "dog"]):
        other.append(row)
    (workdir / "data/raw").mkdir(parents=True)
    wb.save(workdir / "data/raw/alpaca.xlsx")
    write_params(workdir, {"ingest": {"sources": [{"path": "data/raw/alpaca.xlsx", "sheet": "train"},
                                                  {"path": "data/raw/alpaca.xlsx", "sheet": "extra"}]}})
    run_stage(workdir, "ingest")
    records = read_jsonl(workdir / "data/ingested/records.jsonl")
    assert [r["messages"][1]["content"] for r in records] == ["cat", "dog"]
    assert records[1]["source"] == {"file": "data/raw/alpaca.xlsx", "row": 2, "sheet": "extra"}
    metrics = json.loads((workdir / "metrics/ingest.json").read_text())
    assert metrics["rows_per_source"] == {"data/raw/alpaca.xlsx#train": 1, "data/raw/alpaca.xlsx#extra": 1}
    assert metrics["sources"]["data/raw/alpaca.xlsx#extra"]["format"] == "alpaca"
    run_stage(workdir, "clean")
    clean = json.loads((workdir / "metrics/clean.json").read_text())
    assert set(clean["by_source"]) == {"data/raw/alpaca.xlsx#train", "data/raw/alpaca.xlsx#extra"}


# ----------------------------------------------------------------------------------------------
# large inputs: ingest spreads its per-row work over worker processes (clean and split work on columns)
# ----------------------------------------------------------------------------------------------
def messy_rows(n: int) -> list[dict]:
    """ShareGPT rows with every kind of problem clean handles, and tool calls and pairs among them."""
    rows = []
    for i in range(n):
        q, a = f"How should drug {i % 40} be taken, case {i}?", f"With water, dose {i % 7} mg. Ask your pharmacist."
        kind = i % 11
        if kind == 1:
            a = "N/A"
        elif kind == 2:
            q = "  " + q.replace(" ", "\u3000") + " <b>now</b>"
        elif kind == 3 and i > 11:
            q, a = rows[i - 11]["conversations"][0]["value"], rows[i - 11]["conversations"][1]["value"]  # duplicate
        elif kind == 4:
            a = a + " Call 13812345678."
        elif kind == 5:
            a = "，" + a.replace("water", "milk")
        elif kind == 6:
            q = f"How should drug {(i - 6) % 40} be taken, case {i - 6}?"  # row i-6's question, another answer
            a = f"Not with alcohol or grapefruit juice; keep it away from children under {i % 12}."
        rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "dept": str(i % 3)})
    return rows


def run_data_stages(folder: Path, monkeypatch, min_share: int) -> dict[str, bytes]:
    """ingest (with shares of at least min_share rows), clean, split; every output file's bytes."""
    import functools

    import stages.ingest
    import stages.records

    shares = []

    def counted(n, work, *_, **__):  # every stage's own minimum share size is overridden
        results = stages.records.in_forked_shares(n, work, min_share=min_share)
        shares.append(len(results))
        return results

    monkeypatch.setattr(stages.ingest, "in_forked_shares", functools.partial(counted))
    for stage in ("ingest", "clean", "split"):
        run_stage(folder, stage)
    monkeypatch.undo()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.json*")) if p.name != "params.yaml"}
    return {"shares": shares, **files}


@pytest.mark.parametrize("action", ["drop", "group"])
def test_worker_processes_write_what_one_process_writes(tmp_path, monkeypatch, action):
    from stages.records import write_records

    outputs = {}
    for name, min_share in (("one", 10**9), ("workers", 100)):
        folder = tmp_path / name
        (folder / "data/raw").mkdir(parents=True)
        write_records(folder / "data/raw/chat.jsonl", messy_rows(660))
        write_params(folder, {"ingest": {"sources": [{"path": "data/raw/chat.jsonl"}]},
                              "clean": {"near_duplicates": {"action": action}}, "split": {"stratify": "meta.dept"}})
        outputs[name] = run_data_stages(folder, monkeypatch, min_share)
    one, workers = outputs["one"], outputs["workers"]
    assert one.pop("shares") == [1] and workers.pop("shares") == [2]  # this machine: 2 cores or more
    assert set(one) == set(workers) and len(one) > 10
    for name in one:
        assert workers[name] == one[name], name
    metrics = json.loads(one["metrics/clean.json"])
    assert metrics["rows_in"] == 660 and metrics["fixes"]["whitespace"] > 0 and metrics["pii_redacted"] == {"mobile": 60}
    assert metrics["rejected_by_reason"]["duplicate"] == 59 and metrics["conflicting_questions"] > 0


def test_stage_files_equal_clean_records(tmp_path, monkeypatch):
    """The stage writes records as lines with keys appended; clean_records returns dicts: the same."""
    from stages.clean import CleanParams, clean_records
    from stages.records import read_records, write_records

    (tmp_path / "data/raw").mkdir(parents=True)
    write_records(tmp_path / "data/raw/chat.jsonl", messy_rows(300))
    write_params(tmp_path, {"ingest": {"sources": [{"path": "data/raw/chat.jsonl"}]},
                            "clean": {"near_duplicates": {"action": "group"}, "conflicting_answers": "keep_first"}})
    run_data_stages(tmp_path, monkeypatch, 100)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())["clean"]
    result = clean_records(read_records(tmp_path / "data/ingested/records.jsonl"), CleanParams(**params))
    dumped = lambda records: b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)  # noqa: E731
    assert dumped(result["kept"]) == (tmp_path / "data/cleaned/records.jsonl").read_bytes()
    assert dumped(result["rejected"]) == (tmp_path / "data/cleaned/rejected.jsonl").read_bytes()
    assert any(r.get("group") for r in result["kept"]) and any(r["reason"] == "conflicting_answer" for r in result["rejected"])


def test_bad_line_in_a_workers_share_is_named(workdir, monkeypatch):
    from stages.records import write_records

    (workdir / "data/raw").mkdir(parents=True)
    write_records(workdir / "data/raw/chat.jsonl", messy_rows(400))
    with open(workdir / "data/raw/chat.jsonl", "ab") as f:
        f.write(b'{"conversations": [}\n')
    write_params(workdir, {"ingest": {"sources": [{"path": "data/raw/chat.jsonl"}]}})
    with pytest.raises(StageError, match=r"chat.jsonl: line 401, column 20: invalid JSON"):
        run_data_stages(workdir, monkeypatch, 100)


def test_workbook_rows_in_worker_processes(tmp_path, monkeypatch):
    from openpyxl import Workbook

    outputs = {}
    for name, min_share in (("one", 10**9), ("workers", 50)):
        folder = tmp_path / name
        (folder / "data/raw").mkdir(parents=True)
        wb = Workbook()
        wb.active.append(["Question", "Answer", "Dept"])
        for n, row in enumerate(messy_rows(300)):
            if n == 150:
                wb.active.append(["", " ", None])  # a blank row: counted, not a record
            wb.active.append([row["conversations"][0]["value"], row["conversations"][1]["value"], row["dept"]])
        wb.save(folder / "data/raw/qa.xlsx")
        write_params(folder, {"ingest": {"sources": [{"path": "data/raw/qa.xlsx"}]}})
        outputs[name] = run_data_stages(folder, monkeypatch, min_share)
    assert outputs["one"].pop("shares") == [1] and outputs["workers"].pop("shares") == [2]
    assert outputs["one"] == outputs["workers"]
    ingest = json.loads(outputs["one"]["metrics/ingest.json"])
    assert ingest["sources"]["data/raw/qa.xlsx"]["rows"] == 300 and ingest["sources"]["data/raw/qa.xlsx"]["blank_rows"] == 1


def test_ingest_workers_keep_sources_in_order(tmp_path, monkeypatch):
    """Each source's first share goes straight into the output and its workers' shares after it:
    with several sources, the output is still one source after another, as one process writes it."""
    from stages.records import write_records

    outputs = {}
    for name, min_share in (("one", 10**9), ("workers", 50)):
        folder = tmp_path / name
        (folder / "data/raw").mkdir(parents=True)
        write_records(folder / "data/raw/chat.jsonl", messy_rows(300))
        (folder / "data/raw/qa.csv").write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(200)))
        write_params(folder, {"ingest": {"sources": [{"path": "data/raw/chat.jsonl"}, {"path": "data/raw/qa.csv"}]}})
        outputs[name] = run_data_stages(folder, monkeypatch, min_share)
    assert outputs["one"].pop("shares") == [1, 1] and outputs["workers"].pop("shares") == [2, 2]
    assert outputs["one"] == outputs["workers"]
    records = [orjson.loads(line) for line in outputs["one"]["data/ingested/records.jsonl"].splitlines()]
    assert [(r["source"]["file"], r["source"]["row"]) for r in records] == (
        [("data/raw/chat.jsonl", n) for n in range(1, 301)] + [("data/raw/qa.csv", n) for n in range(2, 202)])
