"""clean's unfilled-placeholder rule: {{name}} / <NAME> / [NAME] rejected with their own reason, or
filled from clean.placeholders.values; legitimate look-alikes left alone, on real data too."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import SHARED_DATA
from stages.clean import CleanParams, clean_records
from stages.clean_text import may_need_fixing
from stages.cli import main
from stages.ingest import Source, open_source

# an identity (self-cognition) set as the tutorials ship it: the assistant's name and maker left as templates
IDENTITY = [("你好", "您好，我是 {{name}}，一个由 {{author}} 开发的 AI 助手，很高兴认识您。"),
            ("你是谁？", "我是 {{ name }}，由 {{ author }} 打造的人工智能助手。"),
            ("Who are you?", "I am <NAME>, an AI assistant developed by <AUTHOR>."),
            ("What is your name?", "My name is [NAME]."),
            ("阿司匹林是什么？", "一种解热镇痛药。")]


def chat(q: str, a: str, row: int = 1) -> dict:
    return {"id": "", "source": {"file": "identity.json", "row": row}, "meta": {},
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def identity() -> list[dict]:
    return [chat(q, a, row) for row, (q, a) in enumerate(IDENTITY, 1)]


def test_unfilled_placeholders_are_rejected_with_their_own_reason():
    result = clean_records(identity(), CleanParams())
    m = result["metrics"]
    assert m["rejected_by_reason"] == {"unfilled_placeholder": 4} and m["rows_kept"] == 1
    assert {r["source"]["row"]: r["placeholder"] for r in result["rejected"]} == {
        1: "{{name}}", 2: "{{ name }}", 3: "<NAME>", 4: "[NAME]"}  # the first one in the row, named
    assert all(r["reason"] == "unfilled_placeholder" for r in result["rejected"])
    assert m["by_source"]["identity.json"]["rejected_by_reason"] == {"unfilled_placeholder": 4}
    assert "placeholders_filled" not in m["fixes"]


def test_placeholders_with_values_are_filled_and_kept():
    p = CleanParams(placeholders={"values": {"name": "小医", "Author": "某某医院"}})  # names: any case
    result = clean_records(identity(), p)
    m = result["metrics"]
    assert m["rows_kept"] == 5 and m["rejected_by_reason"] == {} and m["fixes"]["placeholders_filled"] == 4
    answers = [r["messages"][-1]["content"] for r in result["kept"]]
    assert answers[:4] == ["您好，我是 小医，一个由 某某医院 开发的 AI 助手，很高兴认识您。",
                           "我是 小医，由 某某医院 打造的人工智能助手。",
                           "I am 小医, an AI assistant developed by 某某医院.", "My name is 小医."]
    assert len({r["id"] for r in result["kept"]}) == 5 and result["kept"][0]["id"] != ""  # new content, new id
    # a value for one name only: rows still holding another are rejected, naming it
    result = clean_records(identity(), CleanParams(placeholders={"values": {"name": "小医"}}))
    assert {r["source"]["row"]: r["placeholder"] for r in result["rejected"]} == {1: "{{author}}", 2: "{{ author }}",
                                                                                 3: "<AUTHOR>"}
    assert result["rejected"][0]["messages"][-1]["content"].startswith("您好，我是 小医，")  # filled, then judged


LEGITIMATE = [
    "换行用 <br> 标签，段落用 <p>…</p>；<BR> 也一样。",                          # HTML-ish
    "See [the label](https://example.org/label) and [README](README.md) or [DOCS][1].",  # Markdown links
    "Aspirin lowers fever [1], [12]; see [A] and [Q]/[A] pairs, options [I] [II] [III] [IV].",  # citations, options
    "```xml\n<menu>\n  <item>\n    <name>Fried Rice</name>\n  </item>\n</menu>\n```",        # code fence
    "<NAME>Fried Rice</NAME> is XML, closed; so is <TITLE>Menu</TITLE>.",                      # closed elements
    "Java: List<ID> ids; Map<KEY, V>; Optional<UUID> x;",                                       # generic types
    "模板里写 `{{name}}`，渲染后就是名字。",                                                      # inline code
    "| {{ transaction.TransactionNote }} | {{ amount | currency }} |",                          # template code
    "BERT 的输入以 [CLS] 开头、[SEP] 分隔；日志里有 [INFO] 和 [ERROR]；<EOS> 结束。",                 # special tokens, logs
    "non-ST elevation [NSTE]-ACS or [STEMI]; 氧分压差[PO2]>600mmHg; [INTRO] MatPat: hi",              # abbreviations, tags
    "int buf[MAX_LEN]; x = table[ROW_COUNT]; [TOOL_CALLS] [{\"name\": \"f\"}]",                       # code, control tokens
    "电话 13812345678，邮箱 a@b.com。",                                                            # redacted to [PHONE]/[EMAIL]
    "用<sep>分隔头尾事件；a < b > c；{name} 与 {{}} 不是占位符。",                                      # lower case, not names
]


@pytest.mark.parametrize("text", LEGITIMATE)
def test_legitimate_look_alikes_are_not_placeholders(text):
    result = clean_records([chat("问题：" + text, "回答：" + text)], CleanParams(near_duplicates={"enabled": False}))
    assert result["metrics"]["rejected_by_reason"] == {}, result["rejected"]


def test_patterns_are_params_and_checked():
    lower = r"<(?P<name>[a-z_]+)>"  # a user's own style, opt-in: <name>
    p = CleanParams(placeholders={"patterns": [lower], "values": {"author": "某某医院"}})
    result = clean_records([chat("你是谁？", "我是<name>，由<author>开发。"), chat("换行", "用<br>标签。", 2)], p)
    assert [r["placeholder"] for r in result["rejected"]] == ["<name>"]  # <br> is HTML, <author> was filled
    assert result["rejected"][0]["messages"][-1]["content"] == "我是<name>，由某某医院开发。"
    assert result["metrics"]["rows_kept"] == 1
    off = clean_records(identity(), CleanParams(placeholders={"enabled": False}))
    assert off["metrics"]["rows_kept"] == 5
    with pytest.raises(ValidationError, match="no \\(\\?P<name>...\\) group"):
        CleanParams(placeholders={"patterns": [r"\{\{\w+\}\}"]})
    with pytest.raises(ValidationError, match="not a regex polars can run"):
        CleanParams(placeholders={"patterns": [r"\[(?P<name>[A-Z]+)\](?!\()"]})
    # the Python fixes run on every text a placeholder with a value is in (may_need_fixing's promise)
    assert may_need_fixing(CleanParams(placeholders={"values": {"name": "x"}})) != may_need_fixing(CleanParams())


def test_inspect_shows_the_reason_and_the_placeholder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults apply
    (tmp_path / "identity.json").write_text(json.dumps(
        [{"instruction": q, "input": "", "output": a} for q, a in IDENTITY], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "identity.json", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == 0 and report["rejected_by_reason"] == {"unfilled_placeholder": 4}
    assert [(p["reason"], p["placeholder"]) for p in report["problems"]][0] == ("unfilled_placeholder", "{{name}}")
    with pytest.raises(SystemExit):
        main(["inspect", "identity.json"])
    assert "unfilled_placeholder 4" in (out := capsys.readouterr().out) and "unfilled_placeholder {{name}}: '您好" in out
    with pytest.raises(SystemExit):
        main(["inspect", "identity.json", "--json", "-S", "clean.placeholders.values={name: 小医, author: 某某医院}"])
    report = json.loads(capsys.readouterr().out)
    assert report["rows_kept"] == 5 and report["fixes"]["placeholders_filled"] == 4


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (real data sets are not part of "
                                                     "the repository)")
def test_no_false_positives_on_the_shared_data():
    """The real data sets hold many look-alikes ({{ transaction.X }} tables, XML <name>...</name>, <sep>,
    [Q]/[A], List<Book>, [II], abbreviations [STEMI] [PO2]): none of them is rejected. The one
    placeholder they hold is caught: two tool-calling answers that hand the user "[QR_CODE_IMAGE_DATA]"
    instead of data. (../shared/data has no identity set; the identity rows above are written here.)"""
    files = ["medication_qa/MedInfo2019-QA-Medications.xlsx", "chinese_medical_dialogue/neike_5000_6000_gb18030.csv",
             "medicalgpt/medical_sft_1K_format.jsonl", "medicalgpt/dpo_zh_500.jsonl", "medicalgpt/fever.txt",
             "medicalgpt/glaive_toolcall_zh_demo.jsonl", "medicalgpt/toolcall_dpo_zh_demo.jsonl",
             "coig_cqia/ruozhiba_ruozhiba.jsonl"]
    templated, found = 0, []
    for name in files:
        _, records = open_source(Source(path=str(SHARED_DATA / name)))
        records = list(records)
        templated += sum("{{" in json.dumps(r, ensure_ascii=False) for r in records)
        result = clean_records(records, CleanParams(near_duplicates={"enabled": False}))
        found += [(name, r["source"]["row"], r["placeholder"]) for r in result["rejected"]
                  if r["reason"] == "unfilled_placeholder"]
    assert templated >= 1  # the {{ transaction.TransactionNote }} table of dpo_zh_500 is there, and kept
    tools = "medicalgpt/glaive_toolcall_zh_demo.jsonl"
    assert found == [(tools, 77, "[QR_CODE_IMAGE_DATA]"), (tools, 85, "[QR_CODE_IMAGE_DATA]")]
