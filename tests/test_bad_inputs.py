"""Bad input a user can hand the data stages: each stops with one line naming file, row and
column, exit status 1 and no traceback, and leaves the raw file as it was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, folder_md5, run_stage, write_params
from stages.common import StageError

QA_HEADER = ["Question", "Focus (Drug)", "Answer"]


def xlsx(path: Path, sheets: dict[str, list[list]]) -> None:
    from openpyxl import Workbook

    wb = Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for row in rows:
            ws.append(row)
    wb.save(path)


def docx_file(path: Path, paragraphs: list[str]) -> None:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    document.save(path)


def jsonl(path: Path, *lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")


def good_xlsx(path: Path, answer: str = "Take it with food.") -> None:
    xlsx(path, {"DrugQA": [QA_HEADER, ["What is aspirin?", "Aspirin", "A pain reliever."],
                           ["How to take aspirin?", "Aspirin", answer]],
                "Empty": []})


# Each case: (id, writes the bad file into raw/ and returns its source entry [and extra ingest params],
#             a regex the error must match). The file's path is always part of the message.
def case_missing(raw):
    return {"path": str(raw / "nope.csv")}


def case_folder(raw):
    (raw / "folder.jsonl").mkdir()
    return {"path": str(raw / "folder.jsonl")}


def case_pdf(raw):
    (raw / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    return {"path": str(raw / "paper.pdf")}


def case_empty_jsonl(raw):
    (raw / "empty.jsonl").write_bytes(b"")
    return {"path": str(raw / "empty.jsonl")}


def case_blank_jsonl(raw):
    (raw / "blank.jsonl").write_text("\n  \n\n")
    return {"path": str(raw / "blank.jsonl")}


def case_invalid_json_line(raw):
    jsonl(raw / "bad.jsonl", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
          '{"conversations": [oops]}')
    return {"path": str(raw / "bad.jsonl")}


def case_invalid_json_array(raw):
    (raw / "bad.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    return {"path": str(raw / "bad.json")}


def case_empty_array(raw):
    (raw / "none.json").write_text("[]")
    return {"path": str(raw / "none.json")}


def case_not_an_object(raw):
    jsonl(raw / "list.jsonl", {"instruction": "a", "output": "b"}, ["instruction", "output"])
    return {"path": str(raw / "list.jsonl")}


def case_conversations_not_list(raw):
    jsonl(raw / "conv.jsonl", {"conversations": "human: hi"})
    return {"path": str(raw / "conv.jsonl"), "format": "sharegpt"}


def case_unknown_role(raw):
    jsonl(raw / "roles.jsonl", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
          {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]})
    return {"path": str(raw / "roles.jsonl")}


def case_value_not_text(raw):
    jsonl(raw / "value.jsonl", {"conversations": [{"from": "human", "value": {"text": "hi"}}]})
    return {"path": str(raw / "value.jsonl")}


def case_openai_wrong_role(raw):
    jsonl(raw / "openai.jsonl", {"messages": [{"role": "narrator", "content": "Once"}]})
    return {"path": str(raw / "openai.jsonl")}


def case_alpaca_missing_output(raw):
    jsonl(raw / "alpaca.jsonl", {"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""})
    return {"path": str(raw / "alpaca.jsonl")}


def case_xtuner_missing_input(raw):
    jsonl(raw / "xtuner.jsonl", {"conversation": [{"system": "s", "output": "b"}]})
    return {"path": str(raw / "xtuner.jsonl")}


def case_preference_missing_rejected(raw):
    jsonl(raw / "dpo.jsonl", {"prompt": "q", "chosen": "good"})
    return {"path": str(raw / "dpo.jsonl"), "format": "preference"}


def case_tools_not_json(raw):
    jsonl(raw / "tools.jsonl", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                                "tools": "[{name: weather}]"})
    return {"path": str(raw / "tools.jsonl")}


def case_function_call_not_json(raw):
    jsonl(raw / "call.jsonl", {"conversations": [{"from": "human", "value": "weather?"},
                                                 {"from": "function_call", "value": "get_weather(Beijing)"}]})
    return {"path": str(raw / "call.jsonl")}


def case_undetectable(raw):
    jsonl(raw / "what.jsonl", {"foo": 1, "bar": 2})
    return {"path": str(raw / "what.jsonl")}


def case_bad_utf8_jsonl(raw):
    good = json.dumps({"instruction": "问题", "output": "回答"}, ensure_ascii=False).encode()
    (raw / "bytes.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"in\xff\xfe": 1}\n')
    return {"path": str(raw / "bytes.jsonl")}


def case_binary_as_jsonl(raw):
    (raw / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    return {"path": str(raw / "image.jsonl")}


def case_bad_bytes_csv(raw):
    rows = "question,answer\n" + "".join(f"问题{i},回答{i}\n" for i in range(30))
    data = rows.encode("utf-8").replace("问题3,".encode(), "问题3,".encode() + b"\xc3\x28")
    (raw / "bytes.csv").write_bytes(data)
    return {"path": str(raw / "bytes.csv")}


def case_unknown_encoding(raw):
    (raw / "enc.csv").write_text("question,answer\nq,a\n")
    return {"path": str(raw / "enc.csv"), "encoding": "utf-9"}


def case_ragged_csv(raw):
    (raw / "ragged.csv").write_text("question,answer,topic\nq1,a1,t1\nq2,a2,t2,extra\n")
    return {"path": str(raw / "ragged.csv")}


def case_short_csv_row(raw):
    (raw / "short.csv").write_text("question,answer,topic\nq1,a1,t1\nq2 with a line\nbreak,a2,t2\n")
    return {"path": str(raw / "short.csv")}


def case_unbalanced_quote(raw):
    (raw / "quote.csv").write_text('question,answer\nq1,"a1 starts a quote\n' + "more text\n" * 300 + "q2,a2\n")
    return {"path": str(raw / "quote.csv")}, {"max_cell_chars": 1000}


def case_misnamed_column(raw):
    (raw / "cols.csv").write_text("Question,Answer\nq,a\n")
    return {"path": str(raw / "cols.csv"), "question": "Questoin", "answer": "Answer"}


def case_duplicate_column(raw):
    (raw / "dup.csv").write_text("question,answer,answer\nq,a,b\n")
    return {"path": str(raw / "dup.csv")}


def case_no_qa_columns(raw):
    (raw / "cols2.csv").write_text("name,age\nann,3\n")
    return {"path": str(raw / "cols2.csv")}


def case_header_only(raw):
    (raw / "header.csv").write_text("question,answer\n\n,\n")
    return {"path": str(raw / "header.csv")}


def case_question_without_answer(raw):
    (raw / "half.csv").write_text("q,a\nx,y\n")
    return {"path": str(raw / "half.csv"), "question": "q"}


def case_json_format_on_csv(raw):
    (raw / "chat.csv").write_text("question,answer\nq,a\n")
    return {"path": str(raw / "chat.csv"), "format": "sharegpt"}


def case_corrupt_xlsx(raw):
    (raw / "corrupt.xlsx").write_bytes(b"this is not a zip file at all")
    return {"path": str(raw / "corrupt.xlsx")}


def case_truncated_xlsx(raw):
    good_xlsx(raw / "whole.xlsx")
    data = (raw / "whole.xlsx").read_bytes()
    (raw / "whole.xlsx").unlink()
    (raw / "cut.xlsx").write_bytes(data[:len(data) // 2])
    return {"path": str(raw / "cut.xlsx")}


def case_sheet_not_found(raw):
    good_xlsx(raw / "qa.xlsx")
    return {"path": str(raw / "qa.xlsx"), "sheet": "Drugs"}


def case_sheet_index(raw):
    good_xlsx(raw / "qa.xlsx")
    return {"path": str(raw / "qa.xlsx"), "sheet": 5}


def case_empty_sheet(raw):
    good_xlsx(raw / "qa.xlsx")
    return {"path": str(raw / "qa.xlsx"), "sheet": "Empty"}


def case_huge_cell(raw):
    good_xlsx(raw / "qa.xlsx", answer="x" * 2000)
    return {"path": str(raw / "qa.xlsx")}, {"max_cell_chars": 1000}


def case_huge_json_cell(raw):
    jsonl(raw / "huge.jsonl", {"conversations": [{"from": "human", "value": "y" * 5000}]})
    return {"path": str(raw / "huge.jsonl")}, {"max_cell_chars": 1000}


def case_missing_meta_column(raw):
    good_xlsx(raw / "qa.xlsx")
    return {"path": str(raw / "qa.xlsx"), "meta": {"drug": "Drug"}}


def case_corrupt_docx(raw):
    (raw / "paper.docx").write_bytes(b"PK\x03\x04 not really a docx")
    return {"path": str(raw / "paper.docx")}


def case_docx_without_questions(raw):
    docx_file(raw / "notes.docx", ["Meeting notes", "Nothing here is a question."])
    return {"path": str(raw / "notes.docx")}


def case_docx_bad_pattern(raw):
    docx_file(raw / "exam.docx", ["1. What?", "答案：That."])
    return {"path": str(raw / "exam.docx"), "question_pattern": "(unclosed"}


def case_listed_twice(raw):
    jsonl(raw / "a.jsonl", {"instruction": "a", "output": "b"})
    return [{"path": str(raw / "a.jsonl")}, {"path": str(raw / "a.jsonl")}]


CASES = [
    ("missing file", case_missing, r"nope\.csv: file not found"),
    ("folder", case_folder, r"folder\.jsonl: is a folder"),
    ("unsupported type", case_pdf, r"paper\.pdf: unsupported file type '\.pdf'"),
    ("empty file", case_empty_jsonl, r"empty\.jsonl: the file is empty"),
    ("blank lines only", case_blank_jsonl, r"blank\.jsonl: the file is empty"),
    ("invalid JSON line", case_invalid_json_line, r"bad\.jsonl: line 2, column 20: invalid JSON"),
    ("invalid JSON array", case_invalid_json_array, r"bad\.json: line 3, column 23: invalid JSON"),
    ("empty JSON array", case_empty_array, r"none\.json: no records in the file"),
    ("line not an object", case_not_an_object, r"list\.jsonl: line 2: expected a JSON object, got list"),
    ("conversations not a list", case_conversations_not_list,
     r"conv\.jsonl: line 1, column 'conversations': expected a list of turns, got str"),
    ("unknown sharegpt role", case_unknown_role,
     r"roles\.jsonl: line 2, column 'conversations\[1\]\.from': unknown role 'robot'"),
    ("turn value not text", case_value_not_text,
     r"value\.jsonl: line 1, column 'conversations\[0\]\.value': expected text, got a JSON dict"),
    ("unknown OpenAI role", case_openai_wrong_role,
     r"openai\.jsonl: line 1, column 'messages\[0\]\.role': unknown role 'narrator'"),
    ("alpaca without output", case_alpaca_missing_output,
     r"alpaca\.jsonl: line 2: cannot detect|alpaca\.jsonl: line 2, column 'output': missing"),
    ("xtuner without input", case_xtuner_missing_input,
     r"xtuner\.jsonl: line 1, column 'conversation\[0\]\.input': missing"),
    ("preference without rejected", case_preference_missing_rejected, r"dpo\.jsonl: line 1, column 'rejected': missing"),
    ("tools not JSON", case_tools_not_json, r"tools\.jsonl: line 1, column 'tools': not valid JSON"),
    ("function_call not JSON", case_function_call_not_json,
     r"call\.jsonl: line 1, column 'conversations\[1\]\.value': a function_call turn must be JSON"),
    ("undetectable format", case_undetectable, r"what\.jsonl: line 1: cannot detect the format from keys \['bar', 'foo'\]"),
    ("undecodable bytes in JSON lines", case_bad_utf8_jsonl,
     r"bytes\.jsonl: line 3, column 5 \(byte \d+\): bytes .* cannot be decoded as utf-8"),
    ("binary file as JSON lines", case_binary_as_jsonl, r"image\.jsonl: line 1, column 1 \(byte 0\): .*utf-8"),
    ("undecodable bytes in a UTF-8 CSV", case_bad_bytes_csv, r"bytes\.csv: line 5, column 5 .*cannot be decoded as utf-8"),
    ("unknown encoding", case_unknown_encoding, r"enc\.csv: unknown encoding 'utf-9'"),
    ("extra CSV field", case_ragged_csv, r"ragged\.csv: row starting at line 3: 4 fields, the header has 3"),
    ("line break in an unquoted cell", case_short_csv_row,
     r"short\.csv: row starting at line 3: 1 fields, the header has 3"),
    ("unbalanced quote (huge cell)", case_unbalanced_quote,
     r"quote\.csv: row starting at line 2: field larger than field limit"),
    ("misnamed column", case_misnamed_column, r"cols\.csv: column 'Questoin' not found \(columns: Question, Answer\); "
                                              r"did you mean 'Question'\?"),
    ("duplicate column", case_duplicate_column, r"dup\.csv: column 'answer' appears 2 times"),
    ("no question/answer columns", case_no_qa_columns, r"cols2\.csv: cannot tell which columns hold the question"),
    ("header only", case_header_only, r"header\.csv: no data rows"),
    ("question without answer column", case_question_without_answer, r"half\.csv: set both question and answer"),
    ("JSON format on a CSV", case_json_format_on_csv, r"chat\.csv: format 'sharegpt' needs JSON"),
    ("corrupt xlsx", case_corrupt_xlsx, r"corrupt\.xlsx: cannot open as a spreadsheet"),
    ("truncated xlsx", case_truncated_xlsx, r"cut\.xlsx: cannot open as a spreadsheet"),
    ("sheet not found", case_sheet_not_found, r"qa\.xlsx: sheet 'Drugs' not found \(sheets: DrugQA, Empty\)"),
    ("sheet index out of range", case_sheet_index, r"qa\.xlsx: sheet index 5 out of range"),
    ("empty sheet", case_empty_sheet, r"qa\.xlsx: sheet 'Empty' is empty"),
    ("huge xlsx cell", case_huge_cell,
     r"qa\.xlsx: row 3, column 'Answer': cell has 2,000 characters, more than ingest\.max_cell_chars=1,000"),
    ("huge JSON cell", case_huge_json_cell,
     r"huge\.jsonl: line 1, column 'conversations\[0\]\.value': cell has 5,000 characters"),
    ("missing meta column", case_missing_meta_column, r"qa\.xlsx: column 'Drug' not found"),
    ("corrupt docx", case_corrupt_docx, r"paper\.docx: cannot open as docx"),
    ("docx without questions", case_docx_without_questions, r"notes\.docx: no question blocks found in 2 paragraphs"),
    ("invalid docx pattern", case_docx_bad_pattern, r"exam\.docx: .*question_pattern/answer_pattern: invalid regex"),
    ("file listed twice", case_listed_twice, r"ingest\.sources lists the same file"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(workdir, make, message):
    raw = workdir / "data/raw"
    raw.mkdir(parents=True)
    made = make(raw)
    sources, extra = (made if isinstance(made, tuple) else (made, {}))
    sources = sources if isinstance(sources, list) else [sources]
    write_params(workdir, {"ingest": {"sources": sources, **extra}})
    before = folder_md5(raw)
    with pytest.raises(StageError, match=message):
        run_stage(workdir, "ingest")
    assert folder_md5(raw) == before  # raw data untouched
    assert not (workdir / "data/ingested/records.jsonl").exists()  # nothing half-written


def test_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("changes, message", [
    ({"ingest": {"sources": [{"path": "x.jsonl", "colum": "q"}]}}, "ingest.sources.0.colum: Extra inputs are not permitted"),
    ({"ingest": {"sources": [{"path": "x.jsonl", "format": "csv"}]}}, "ingest.sources.0.format: Input should be 'auto'"),
    ({"clean": {"near_duplicates": {"action": "merge"}}}, "clean.near_duplicates.action: Input should be 'drop' or 'group'"),
    ({"clean": {"pii": {"kinds": ["passport"]}}}, "clean.pii.kinds.0: Input should be"),
])
def test_bad_params_name_the_key(workdir, changes, message):
    write_params(workdir, changes)
    stage = next(iter(changes))
    with pytest.raises(StageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_stage(workdir, stage)


def test_clean_and_split_name_their_problems(workdir):
    with pytest.raises(StageError, match=r"data/ingested/records\.jsonl: file not found \(run the previous stage first\)"):
        run_stage(workdir, "clean")
    (workdir / "data/ingested").mkdir(parents=True)
    (workdir / "data/ingested/records.jsonl").write_text('{"id": "a", "messages": []}\n{"id": "b", oops}\n')
    with pytest.raises(StageError, match=r"records\.jsonl: line 1: not a canonical record"):
        run_stage(workdir, "clean")
    (workdir / "data/ingested/records.jsonl").write_text('\n{"id": "b", oops}\n')
    with pytest.raises(StageError, match=r"records\.jsonl: line 2: invalid JSON"):
        run_stage(workdir, "clean")
    (workdir / "data/cleaned").mkdir(parents=True)
    record = {"id": "x", "source": {"file": "a.jsonl", "row": 1}, "meta": {},
              "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (workdir / "data/cleaned/records.jsonl").write_text(json.dumps(record) + "\n")
    write_params(workdir, {"split": {"mix": [{"source": "tools*.jsonl", "share": 0.1}]}})
    with pytest.raises(StageError, match=r"split\.mix\[0\]: no cleaned records from 'tools\*\.jsonl'"):
        run_stage(workdir, "split")
    write_params(workdir, {"split": {"mix": [{"source": "a.jsonl", "share": 0.1, "max_rows": 3}]}})
    with pytest.raises(StageError, match=r"split\.mix\[0\] \(a\.jsonl\): set exactly one of max_rows and share"):
        run_stage(workdir, "split")


def clean_env() -> dict:
    return {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


def test_exit_status_and_no_traceback(workdir):
    """As a user sees it: `python -m stages.ingest` on a corrupt workbook and a bad JSON line."""
    raw = workdir / "data/raw"
    raw.mkdir(parents=True)
    for make in (case_corrupt_xlsx, case_invalid_json_line):
        write_params(workdir, {"ingest": {"sources": [make(raw)]}})
        result = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=workdir, capture_output=True, text=True,
                                env=clean_env())
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and str(raw) in result.stderr
        assert "Traceback" not in result.stderr


def test_inspect_reports_bad_files_and_goes_on(workdir):
    raw = workdir / "data/raw"
    raw.mkdir(parents=True)
    bad = case_unknown_role(raw)["path"]
    good = raw / "good.jsonl"
    jsonl(good, {"instruction": "What is aspirin?", "output": "A pain reliever."})
    result = subprocess.run([sys.executable, "-m", "stages.cli", "inspect", bad, str(good), "--json"], cwd=workdir,
                            capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert "conversations[1].from': unknown role 'robot'" in first["error"] and first["file"] == bad
    assert second["rows_read"] == second["rows_kept"] == 1
