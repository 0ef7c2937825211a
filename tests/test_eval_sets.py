"""Eval sets (issue 12): the mcq ingest format, the option-letter parser, the tool-call check,
OpenCompass datasets by name, and the eval stage scoring every set for every model.

The unit tests run in any environment; the stage test runs .venvs/opencompass on tiny models built
in .venvs/core (as tests/test_eval.py does): the "merged" model is trained until it reproduces every
test answer, so its mcq accuracy and tool-call accuracy must be exactly 100, and the near-random
base model calls no tool (0).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from stages import tool_calls
from stages.common import StageError
from stages.ingest import Source, open_source
from stages.mcq import option_letter, read_blocks
from test_eval import BUILD_MODELS, CORE_PY, OC_PY, REPO

# ---------------------------------------------------------------------------------------------
# the option-letter parser
# ---------------------------------------------------------------------------------------------
PARSED = [
    ("B", "B"), ("b", "B"), (" C. ", "C"), ("答案：B", "B"), ("答案是 D", "D"), ("正确答案为(C)", "C"),
    ("The answer is (C).", "C"), ("answer: b", "B"), ("(D) because it lowers pressure", "D"),
    ("A. twice daily", "A"), ("I would rule out A and B; the answer is D.", "D"),  # distractor letters
    ("A drug like this treats asthma, so B", "B"),  # the article "A" is no option
    ("选C", "C"), ("A and C", ""), ("no idea", ""), ("", ""),
    ("The answer is E", ""),  # not an option of a four-option question
]


@pytest.mark.parametrize("text,letter", PARSED)
def test_option_letter(text, letter):
    assert option_letter(text, "ABCD") == letter


def test_option_letter_more_options():
    assert option_letter("The answer is E", "ABCDE") == "E"


# ---------------------------------------------------------------------------------------------
# mcq ingest, from each container
# ---------------------------------------------------------------------------------------------
EXPECTED = [("What is 2+2?", ["3", "4", "5", "6"], "B"), ("以下哪个是解热镇痛药？", ["阿司匹林", "胰岛素", "青霉素", "华法林"], "A")]


def ingest(path, **kw) -> tuple[dict, list[dict]]:
    info, records = open_source(Source(path=str(path), **kw))
    return info, list(records)


def assert_expected(records):
    assert [(r["messages"][-2]["content"].split("\n")[0], r["mcq"]["options"], r["mcq"]["answer"]) for r in records] \
        == EXPECTED
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["mcq"]["answer"]} for r in records)
    assert records[0]["messages"][-2]["content"] == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6"


def test_mcq_from_xlsx(tmp_path):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["题目", "A", "B", "C", "D", "答案", "科目"])
    ws.append(["What is 2+2?", 3, 4, 5, 6, "B", "math"])
    ws.append(["以下哪个是解热镇痛药？", "阿司匹林", "胰岛素", "青霉素", "华法林", "a", "药学"])
    wb.save(tmp_path / "exam.xlsx")
    info, records = ingest(tmp_path / "exam.xlsx")
    assert info["format"] == "mcq" and info["mapping"]["options"] == ["A", "B", "C", "D"]
    assert_expected(records)
    assert records[1]["meta"] == {"科目": "药学"}


def test_mcq_from_csv_with_named_columns(tmp_path):
    (tmp_path / "exam.csv").write_text("stem,opt1,opt2,opt3,opt4,key\nWhat is 2+2?,3,4,5,6,答案：B\n"
                                       "以下哪个是解热镇痛药？,阿司匹林,胰岛素,青霉素,华法林,阿司匹林\n", encoding="utf-8")
    info, records = ingest(tmp_path / "exam.csv", format="mcq", question="stem", answer="key",
                           options=["opt1", "opt2", "opt3", "opt4"])
    assert info["format"] == "mcq"
    assert_expected(records)  # an answer given as the option's text is its letter


def test_mcq_from_json_and_jsonl(tmp_path):
    rows = [{"question": "What is 2+2?", "options": ["3", "4", "5", "6"], "answer": "B"},
            {"question": "以下哪个是解热镇痛药？", "options": {"A": "阿司匹林", "B": "胰岛素", "C": "青霉素", "D": "华法林"},
             "answer": "(A)"}]
    (tmp_path / "exam.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    info, records = ingest(tmp_path / "exam.jsonl")
    assert info["format"] == "mcq" and info["detected"]
    assert_expected(records)
    renamed = [{"stem": r["question"], "choices": r["options"], "label": r["answer"]} for r in rows]
    (tmp_path / "exam.json").write_text(json.dumps(renamed, ensure_ascii=False), encoding="utf-8")
    info, records = ingest(tmp_path / "exam.json", format="mcq", fields={"question": "stem", "options": "choices",
                                                                          "answer": "label"})
    assert_expected(records)


def test_mcq_from_text_blocks(tmp_path):
    (tmp_path / "exam.txt").write_text(
        "第一部分 单选题\n\n1. What is 2+2?\nA. 3   B. 4\nC. 5   D. 6\nanswer: B\n\n"
        "2. 以下哪个是解热镇痛药？\nA、阿司匹林\nB、胰岛素\nC、青霉素\nD、华法林\n答案：A\n解析：阿司匹林是解热镇痛药。\n",
        encoding="utf-8")
    info, records = ingest(tmp_path / "exam.txt")
    assert info["format"] == "mcq" and info["detected"]
    assert_expected(records)
    assert [r["source"]["row"] for r in records] == [3, 8]
    assert records[1]["meta"] == {"explanation": "解析：阿司匹林是解热镇痛药。"}


def test_mcq_from_docx_exam(tmp_path):
    import docx

    document = docx.Document()
    for line in ["一、单选题", "1. What is 2+2?", "A. 3", "B. 4", "C. 5", "D. 6", "【答案】B",
                 "2. 以下哪个是解热镇痛药？", "A. 阿司匹林  B. 胰岛素  C. 青霉素  D. 华法林", "答案：A"]:
        document.add_paragraph(line)
    document.save(tmp_path / "exam.docx")
    info, records = ingest(tmp_path / "exam.docx", format="mcq")
    assert info["format"] == "mcq" and info["unit"] == "paragraph"
    assert_expected(records)
    assert ingest(tmp_path / "exam.docx")[0]["format"] == "exam"  # auto keeps docx as question/answer blocks


def test_mcq_detection_leaves_other_data_alone(tmp_path):
    """A corpus, a question/answer table and chat JSON keep their formats (format auto)."""
    (tmp_path / "corpus.txt").write_text("1. Aspirin is a pain reliever.\nA. note: it thins blood.\n\nMore text.\n")
    (tmp_path / "qa.csv").write_text("question,answer\nWhat is A?,B.\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "A or B?"},
                                                                       {"from": "gpt", "value": "B"}]}) + "\n")
    assert ingest(tmp_path / "corpus.txt")[0]["format"] == "text"
    assert ingest(tmp_path / "qa.csv")[0]["format"] == "table"
    assert ingest(tmp_path / "chat.jsonl")[0]["format"] == "sharegpt"


def test_mcq_bad_answer_names_the_row(tmp_path):
    (tmp_path / "exam.jsonl").write_text(json.dumps({"question": "Q?", "options": ["x", "y"], "answer": "C"}) + "\n")
    info, records = open_source(Source(path=str(tmp_path / "exam.jsonl")))
    with pytest.raises(StageError, match=r"exam.jsonl: line 1, column 'answer': answer 'C' is not one of the option "
                                         r"letters A, B"):
        list(records)


def test_text_blocks_with_options_on_one_line():
    [(row, block)] = read_blocks(["1. Pick one", "(A) x (B) y (C) z", "【答案】C"])
    assert row == 1 and block["options"] == ["x", "y", "z"] and block["answer"] == "C"


# ---------------------------------------------------------------------------------------------
# the tool-call check
# ---------------------------------------------------------------------------------------------
REFERENCE = {"name": "lookup_drug", "arguments": {"drug": "tamino", "field": "dose"}}


@pytest.mark.parametrize("reply,checks", [
    ('{"name": "lookup_drug", "arguments": {"field": "dose", "drug": "tamino"}}', (True, True, True)),
    ('Action: lookup_drug\nAction Input: {"drug": "tamino", "field": "dose"}', (True, True, True)),
    ('<tool_call>{"name": "lookup_drug", "arguments": "{\\"drug\\": \\"tamino\\", \\"field\\": \\"dose\\"}"}</tool_call>',
     (True, True, True)),  # arguments as JSON text, as OpenAI sends them
    ('{"name": "check_stock", "arguments": {"drug": "tamino", "field": "dose"}}', (False, True, False)),  # wrong tool
    ('{"name": "lookup_drug", "arguments": {"drug": "tamino", "field": "food"}}', (True, True, False)),  # wrong args
    ('Action: lookup_drug\nAction Input: {drug: tamino, field: dose}', (True, False, False)),  # invalid JSON
    ('{"name": "lookup_drug", "arguments": "drug=tamino"}', (True, False, False)),  # arguments not JSON
    ("The usual adult dose of tamino is 5 mg.", (False, False, False)),  # no call at all
])
def test_tool_call_checks(reply, checks):
    result = tool_calls.score_one(reply, REFERENCE)
    assert (result["tool_name"], result["args_valid_json"], result["args_exact"]) == checks
    assert result["accuracy"] == all(checks)


def test_tool_call_scores_are_percentages():
    replies = ['{"name": "lookup_drug", "arguments": {"drug": "tamino", "field": "dose"}}',
               '{"name": "check_stock", "arguments": {"drug": "tamino"}}', "no call", "Action: lookup_drug\nAction Input: {"]
    assert tool_calls.score(replies, [json.dumps(REFERENCE)] * 4) == {
        "accuracy": 25.0, "tool_name": 50.0, "args_valid_json": 50.0, "args_exact": 25.0}


def test_reference_call_from_both_styles(tmp_path):
    """The held-out call of a ShareGPT function_call conversation (as ingest reads it) and of a ReAct one."""
    sharegpt = {"conversations": [{"from": "human", "value": "Dose of tamino?"},
                                  {"from": "function_call", "value": json.dumps(REFERENCE)},
                                  {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "5 mg."}],
                "tools": json.dumps([{"name": "lookup_drug"}])}
    (tmp_path / "tools.jsonl").write_text(json.dumps(sharegpt) + "\n")
    [record] = ingest(tmp_path / "tools.jsonl")[1]
    assert tool_calls.reference_call(record) == (1, REFERENCE)
    react = {"messages": [{"role": "user", "content": "Dose of tamino?"}, {"role": "assistant", "content":
             'Action: lookup_drug\nAction Input: {"drug": "tamino", "field": "dose"}\n'}]}
    assert tool_calls.reference_call(react) == (1, REFERENCE)
    assert tool_calls.reference_call({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": '{"name": "x"}'}]}) is None


def test_eval_sets_partition_the_test_split():
    from stages import eval_sets

    mcq = {"id": "m", "messages": [{"role": "user", "content": "Q\nA. x\nB. y"}, {"role": "assistant", "content": "B"}],
           "mcq": {"options": ["x", "y"], "answer": "B"}}
    tool = {"id": "t", "messages": [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content":
            json.dumps(REFERENCE), "tool_calls": [{"type": "function", "function": {
                "name": "lookup_drug", "arguments": json.dumps(REFERENCE["arguments"])}}]},
            {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "5 mg."}]}
    chat = {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert [eval_sets.kind(r) for r in (mcq, tool, chat)] == ["mcq", "tool_calls", "generative"]
    [row] = eval_sets.tool_rows([tool], 0)
    assert len(row["messages"]) == 2 and json.loads(row["answer"]) == REFERENCE
    [row] = eval_sets.mcq_rows([mcq], 0)
    assert row["answer"] == "B" and row["options"] == "AB"


# ---------------------------------------------------------------------------------------------
# the stage, end to end on tiny models
# ---------------------------------------------------------------------------------------------
needs_envs = pytest.mark.skipif(not (OC_PY.exists() and CORE_PY.exists()),
                                reason=".venvs/opencompass or .venvs/core is missing: run ./setup.sh")
MCQ = [("Which condition is tamino used to treat?", ["asthma", "epilepsy", "acid reflux", "depression"], "C"),
       ("How often is lovatin usually taken?", ["once daily", "twice daily", "three times daily", "every eight hours"], "A"),
       ("How should pelranva be taken?", ["with food", "on an empty stomach", "with or without food",
                                          "with a full glass of water"], "D")]
TOOLS = [{"name": "lookup_drug", "arguments": {"drug": "tamino", "field": "dose"}},
         {"name": "check_stock", "arguments": {"drug": "famipel"}}]


def write_split(root) -> None:
    from stages.mcq import prompt_text

    rows = [{"id": "qa", "source": {"file": "t", "row": 0}, "meta": {}, "messages": [
        {"role": "user", "content": "Where do I keep my tamino?"},
        {"role": "assistant", "content": "Store tamino below 25 degrees in its original pack."}]}]
    for i, (q, options, answer) in enumerate(MCQ):
        rows.append({"id": f"m{i}", "source": {"file": "t", "row": 1 + i}, "meta": {}, "messages": [
            {"role": "user", "content": prompt_text(q, options)}, {"role": "assistant", "content": answer}],
            "mcq": {"options": options, "answer": answer}})
    for i, call in enumerate(TOOLS):  # ending at the call: the test models learn the final turn
        rows.append({"id": f"t{i}", "source": {"file": "t", "row": 5 + i}, "meta": {}, "messages": [
            {"role": "user", "content": f"Please check {call['arguments']['drug']}."},
            {"role": "assistant", "content": json.dumps(call), "tool_calls": [
                {"type": "function", "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}]})
    (root / "data/split").mkdir(parents=True)
    (root / "data/split/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_eval(root, eval_params: str):
    (root / "params.yaml").write_text(eval_params)
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNEPIPE_PARAMS=str(root / "params.yaml"),
               COMPASS_DATA_CACHE=str(root / "no_data"))
    proc = subprocess.run([str(OC_PY), "-m", "stages.eval"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((root / "metrics/eval.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sets")
    write_split(root)
    proc = subprocess.run([str(CORE_PY), "-c", BUILD_MODELS, str(root)], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@needs_envs
def test_every_set_for_every_model(built):
    proc, metrics = run_eval(built, "eval:\n  models: [base, merged, turbomind]\n  max_new_tokens: 24\n"
                                    "  mcq: {mode: ppl}\n  opencompass_datasets: [ceval_gen]\n")
    models = {"base", "merged", "turbomind_w4a16_dequant"}
    assert set(metrics) == {"demo_qa", "mcq", "tool_calls", "ceval_gen"}
    assert all(set(metrics[s]) == models for s in ("demo_qa", "mcq", "tool_calls"))
    assert metrics["mcq"]["merged"] == {"accuracy": 100.0}
    assert metrics["tool_calls"]["merged"] == {"accuracy": 100.0, "tool_name": 100.0, "args_valid_json": 100.0,
                                               "args_exact": 100.0}
    assert metrics["tool_calls"]["base"]["accuracy"] == 0.0
    assert metrics["ceval_gen"] == {"skipped": metrics["ceval_gen"]["skipped"]}
    assert "no local data" in metrics["ceval_gen"]["skipped"] and "skipping OpenCompass dataset ceval_gen" in proc.stdout
    # the comparison: one row per set x metric x model, and predictions side by side per sample
    lines = (built / "plots/eval_scores.csv").read_text().splitlines()
    assert lines[0] == "metric,model,score" and len(lines) == 1 + 3 * (4 + 1 + 4)
    assert "mcq/accuracy,merged,100.0" in lines
    samples = [json.loads(line) for line in (built / "eval/predictions_by_sample.jsonl").read_text().splitlines()]
    assert {(s["set"], s["id"]) for s in samples} == {("demo_qa", "qa"), *(("mcq", f"m{i}") for i in range(3)),
                                                      *(("tool_calls", f"t{i}") for i in range(2))}
    assert all(set(s["predictions"]) == models for s in samples)
    for s in samples:
        if s["set"] == "mcq":  # ppl: the prediction is the likeliest letter
            assert s["predictions"]["merged"] == s["reference"] and s["correct"]["merged"] is True
    base_correct = [s["correct"]["base"] for s in samples if s["set"] == "mcq"]
    # OpenCompass's summary rounds to 2 decimals; the near-random base picks 1 of 3 (seeded, pinned CPU math)
    assert metrics["mcq"]["base"]["accuracy"] == round(100.0 * sum(base_correct) / 3, 2) == 33.33


@needs_envs
def test_mcq_by_generation(built):
    _, metrics = run_eval(built, "eval:\n  models: [merged]\n  max_new_tokens: 24\n  mcq: {mode: gen}\n")
    assert metrics["mcq"] == {"merged": {"accuracy": 100.0}}
    config = (built / "eval/opencompass_config.py").read_text()
    assert "stages.oc_plugins.OptionAccuracyEvaluator" in config and not (built / "eval/opencompass_ppl_config.py").exists()
