"""ingest: read every raw source named in params and map each row to a canonical record.

Containers: xlsx (any sheet; python-calamine), csv/tsv in any encoding (BOM, UTF-8, else
charset-normalizer: GB18030/GBK, Big5, ...), JSON arrays, JSON lines (also in ".json" files),
docx exam papers (question and answer blocks; python-docx) and plain-text corpora.
Formats: table (a column mapping), alpaca, sharegpt (with tools and function_call/observation
turns; in a row with tools, an assistant turn in ReAct style, "Action: name" / "Action Input: {json}",
is a tool call too), messages (OpenAI), xtuner (conversation of system/input/output), preference
(chosen/rejected), mcq (multiple-choice questions from columns, JSON fields or text blocks;
stages/mcq.py) and text (continued pretraining). `format: auto` (the default) detects the format
and the column mapping where that is unambiguous, and says what it detected.

Canonical record, one JSON object a line (stages/records.py describes the optional keys):
  {"id": content hash, "source": {"file", "row"}, "messages": [{"role", "content"}], "meta": {...}}
Nothing is dropped here: empty or odd rows are kept as they are, for clean to judge and count.
Anything a user can get wrong in a file stops the stage with an error naming file, row and column.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import difflib
import functools
import io
import itertools
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import orjson

from stages import mcq, tool_calls
from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json
from stages.records import append_file, in_forked_shares, no_cycle_collection, record_id, spans_of_share

FORMATS = ("table", "alpaca", "sharegpt", "messages", "xtuner", "preference", "exam", "mcq", "text")
CONTAINERS = {".xlsx": "xlsx", ".xlsm": "xlsx", ".xls": "xlsx", ".ods": "xlsx", ".csv": "csv", ".tsv": "csv",
              ".json": "json", ".jsonl": "json", ".ndjson": "json", ".docx": "docx", ".txt": "text", ".md": "text"}


class Source(Params):
    path: str
    format: Literal["auto", "table", "alpaca", "sharegpt", "messages", "xtuner", "preference", "exam", "mcq",
                    "text"] = "auto"
    encoding: str = "auto"                      # auto: csv/txt BOM, UTF-8, else detected; JSON BOM or UTF-8
    sheet: str | int | None = None              # xlsx: sheet name or 0-based index; default the first
    delimiter: str | None = None                # csv: default sniffed from the header line (, tab ; |)
    question: str | list[str] | None = None     # table: column(s) of the user turn; default detected
    answer: str | None = None                   # table: column of the assistant turn; default detected
    options: list[str] | None = None            # mcq table: the option columns in letter order; default A, B, ...
    system: str | None = None                   # a system prompt for every row of this source
    system_column: str | None = None            # table: a column holding each row's system prompt
    meta: dict[str, str] | None = None          # meta key -> column; default: every column not mapped
    fields: dict[str, str] = {}                 # JSON formats: renamed keys, e.g. {instruction: prompt}
    chunk_chars: int = 2000                     # text: lines are packed into chunks of at most this
    question_pattern: str | None = None         # exam (docx): regex starting a question block
    answer_pattern: str | None = None           # exam (docx): regex starting its answer


class IngestParams(Params):
    sources: list[Source]
    max_cell_chars: int = 100_000               # a longer cell is an error (often an unbalanced CSV quote)


class RowProblem(Exception):
    """A problem in one row: the caller adds file and row to the column and message."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column, self.message = column, message


# ----------------------------------------------------------------------------------------------
# Cells and text
# ----------------------------------------------------------------------------------------------
def as_text(value: Any) -> str:
    """Cell value to text; NaN/None become "" so clean can report them as empty."""
    if isinstance(value, str):  # the common case first
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def decode(path: str, data: bytes, encoding: str) -> tuple[str, str]:
    """Bytes to text, and the encoding used. auto: a BOM, else strict UTF-8, else the encoding
    charset-normalizer finds (GB18030 for the Chinese medical dialogue CSV). A file that is
    UTF-8 but for a few bad bytes is corrupt, not in another encoding: that is an error."""
    if encoding != "auto":
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise StageError(f"{path}: unknown encoding '{encoding}' (ingest.sources[].encoding)") from None
        return decode_strict(path, data, encoding), encoding
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return decode_strict(path, data, name), name
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        first_error = e
    lossy = data.decode("utf-8", "replace")
    bad = lossy.count("\ufffd")
    good = sum(1 for ch in lossy if ch > "\x7f") - bad
    if good > 20 * bad:
        raise undecodable(path, data, first_error, "utf-8")
    from charset_normalizer import from_bytes

    sample = data if len(data) <= 1_000_000 else data[:data.rfind(b"\n", 0, 1_000_000) + 1 or 1_000_000]
    best = from_bytes(sample).best()  # a sample cut at a line end, so no character is cut in two
    if best is None:
        raise undecodable(path, data, first_error, "utf-8", "utf-8 or any encoding charset-normalizer knows")
    name = {"gb2312": "gb18030", "gbk": "gb18030"}.get(best.encoding, best.encoding)  # supersets
    return decode_strict(path, data, name), name


def decode_strict(path: str, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise undecodable(path, data, e, encoding) from None


def undecodable(path: str, data: bytes, e: UnicodeDecodeError, encoding: str, tried: str | None = None) -> StageError:
    line = data.count(b"\n", 0, e.start) + 1
    column = len(data[data.rfind(b"\n", 0, e.start) + 1:e.start].decode(encoding, "replace")) + 1  # characters
    return StageError(f"{path}: line {line}, column {column} (byte {e.start}): bytes {data[e.start:e.start + 4]!r} "
                      f"cannot be decoded as {tried or encoding}; set ingest.sources[].encoding if the file uses another")


def check_size(value: str, column: str, limit: int) -> str:
    if len(value) > limit:
        raise RowProblem(column, f"cell has {len(value):,} characters, more than ingest.max_cell_chars={limit:,} "
                                 "(in a CSV an unbalanced quote often swallows the rest of the file)")
    return value


# ----------------------------------------------------------------------------------------------
# Containers: each yields (row number as a user sees it, row) after a header or first peek
# ----------------------------------------------------------------------------------------------
def read_xlsx(src: Source, info: dict) -> tuple[list[str], list[tuple[int, list]]]:
    import python_calamine as calamine

    try:
        wb = calamine.CalamineWorkbook.from_path(src.path)
    except Exception as e:  # calamine raises its own types for a corrupt, encrypted or non-xlsx file
        raise StageError(f"{src.path}: cannot open as a spreadsheet ({e.__class__.__name__}: {e})") from None
    names = wb.sheet_names
    if isinstance(src.sheet, int):
        if not 0 <= src.sheet < len(names):
            raise StageError(f"{src.path}: sheet index {src.sheet} out of range (sheets: {', '.join(names)})")
        name = names[src.sheet]
    elif src.sheet is not None:
        if src.sheet not in names:
            raise StageError(f"{src.path}: sheet '{src.sheet}' not found (sheets: {', '.join(names)})")
        name = src.sheet
    else:
        if not names:
            raise StageError(f"{src.path}: the workbook has no sheets")
        name = names[0]
    try:
        sheet = wb.get_sheet_by_name(name)
        rows = sheet.to_python(skip_empty_area=False)
    except Exception as e:
        raise StageError(f"{src.path}: sheet '{name}' cannot be read ({e.__class__.__name__}: {e})") from None
    info["sheet"] = name
    if not rows or all(as_text(v).strip() == "" for v in rows[0]):
        raise StageError(f"{src.path}: sheet '{name}' is empty (no header row)")
    header = [as_text(h).strip() for h in rows[0]]
    return header, list(enumerate(rows[1:], start=2))


def read_csv(src: Source, info: dict, limit: int) -> tuple[list[str], list[tuple[int, list]]]:
    text, info["encoding"] = decode(src.path, Path(src.path).read_bytes(), src.encoding)
    if not text.strip():
        raise StageError(f"{src.path}: the file is empty")
    first_line = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = src.delimiter or ("\t" if src.path.endswith(".tsv") else
                                  max(",\t;|", key=first_line.count))
    csv.field_size_limit(limit + 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    info["delimiter"] = delimiter
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise StageError(f"{src.path}: line 1: the header cannot be parsed ({e})") from None

    def rows() -> Iterator[tuple[int, list]]:
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise StageError(f"{src.path}: row starting at line {start}: {e} (ingest.max_cell_chars={limit:,}; "
                                 "an unbalanced quote often swallows the rest of the file)") from None
            extra_values = any(v.strip() for v in values[len(header):])
            if values and (len(values) < len(header) or extra_values):
                raise StageError(f"{src.path}: row starting at line {start}: {len(values)} fields, the header has "
                                 f"{len(header)} (a stray delimiter, or a line break in an unquoted cell?)")
            yield start, values[:len(header)]
            start = reader.line_num + 1

    return header, list(rows())


def read_json(src: Source, info: dict) -> tuple[str, list[tuple[int, Any]], Callable[[int, Any], Any]]:
    """A JSON array (items numbered from 1), JSON lines (line numbers), or one JSON object holding
    a list of records. Returns the unit rows are counted in ("item" or "line"), the rows and how
    to parse one: JSON lines are parsed only as a worker process reads its share of them."""
    data = Path(src.path).read_bytes()
    plain_utf8 = src.encoding in ("auto", "utf-8", "utf8") and not data[:4].startswith(
        (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    if plain_utf8 and (lines := JsonLines.of(src.path, data)) is not None:
        info["container"], info["encoding"] = "jsonl", "utf-8"
        return "line", lines, parsed
    text, info["encoding"] = decode(src.path, data, "utf-8" if plain_utf8 else src.encoding)
    if not text.strip():
        raise StageError(f"{src.path}: the file is empty")
    if text.lstrip("\ufeff \t\r\n").startswith("["):
        info["container"] = "json array"
        try:
            items = orjson.loads(text.lstrip("\ufeff"))
        except orjson.JSONDecodeError as e:
            raise StageError(f"{src.path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        return "item", list(enumerate(items, start=1)), parsed
    lines = text.lstrip("\ufeff").split("\n")
    filled = [line for line in itertools.islice((x for x in lines if x.strip()), 2)]
    try:
        whole = orjson.loads(filled[0]) if len(filled) == 1 else None
    except orjson.JSONDecodeError:
        whole = None
    if len(filled) > 1:
        try:
            orjson.loads(filled[0])
        except orjson.JSONDecodeError:  # not JSON lines: one object over several lines?
            try:
                whole = orjson.loads(text.lstrip("\ufeff"))
            except orjson.JSONDecodeError:
                whole = None
    if isinstance(whole, dict):
        lists = [v for v in whole.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        record_keys = {src.fields.get(k, k) for k in ("conversations", "messages", "conversation")}
        if len(whole) == 1 and len(lists) == 1 and not set(whole) & record_keys:  # {"data": [records]}
            info["container"] = "json object"
            return "item", list(enumerate(lists[0], start=1)), parsed
        if len(filled) > 1:
            info["container"] = "json object"
            return "item", [(1, whole)], parsed
    info["container"] = "jsonl"

    def parse(number: int, line: str) -> Any:
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise StageError(f"{src.path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None

    return "line", [(number, line) for number, line in enumerate(lines, start=1) if line.strip()], parse


class JsonLines:
    """A UTF-8 JSON-lines file as rows (line number, the line parsed), in shares of bytes rather
    than lines: a worker process parses its own share straight from the file's bytes (this
    process never splits all of it: objects it made, touched by the workers, would be copied
    page by page). share lo..hi holds the lines that start at a byte in lo..hi."""

    min_share = 8_000_000  # bytes: a file under 16 MB is not worth a second process

    def __init__(self, path: str, data: bytes, first: tuple[int, int, int]):
        self.path, self.data, self.view, self.first_span = path, data, memoryview(data), first

    @classmethod
    def of(cls, path: str, data: bytes) -> JsonLines | None:
        """The file as JSON lines if it plainly is (two or more lines, the first one JSON and no
        array); None for anything read_json must look at as a whole."""
        firsts = list(itertools.islice(spans_of_share(data, 0, len(data)), 2))
        if len(firsts) < 2:
            return None
        first_line = data[firsts[0][0]:firsts[0][1]]
        if first_line.lstrip()[:1] == b"[":
            return None
        try:
            orjson.loads(first_line)
        except orjson.JSONDecodeError:
            return None
        return cls(path, data, firsts[0])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, share: slice) -> Iterator[tuple[int, Any]]:
        return ((number, self.parse(start, end, number))
                for start, end, number in spans_of_share(self.data, share.start, share.stop))

    def parse(self, start: int, end: int, number: int) -> Any:
        try:
            return orjson.loads(self.view[start:end])  # orjson checks the UTF-8 as it parses
        except orjson.JSONDecodeError as e:
            try:
                self.data[start:end].decode("utf-8")
            except UnicodeDecodeError as bad:
                raise undecodable(self.path, self.data, UnicodeDecodeError(
                    "utf-8", self.data, start + bad.start, start + bad.end, bad.reason), "utf-8") from None
            raise StageError(f"{self.path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None

    def first(self) -> tuple[int, Any]:
        start, end, number = self.first_span
        return number, self.parse(start, end, number)


def table_row(header: list[str], number: int, values: list) -> dict:
    return dict(zip(header, values))


def parsed(number: int, row: Any) -> Any:
    return row


QUESTION_START = (r"^\s*(?:第\s*\d+\s*题\s*[.．、:：]?|\d+\s*[.．、:：)）]|[(（]\d+[)）]|【\s*(?:问题|题目)\s*】\s*[:：]?"
                  r"|(?:问题|问)\s*[:：]|Q\s*\d*\s*[.:：])\s*")
ANSWER_START = r"^\s*(?:【\s*(?:参考)?答案\s*】\s*[:：]?|(?:参考)?答案\s*[:：]|答\s*[:：]|Answer\s*[:：])\s*"
SECTION = re.compile(r"^\s*[一二三四五六七八九十]+\s*[、.．]")


def read_docx(src: Source, info: dict, limit: int) -> Iterator[tuple[int, dict]]:
    """Exam papers as question and answer blocks, numbered by the paragraph each question starts
    at: "1. question" [option lines] "答案：B" [解析 lines] ... Section headings ("一、单选题")
    go to meta. A question without an answer is kept with an empty answer for clean to count."""
    import docx

    try:
        paragraphs = [p.text for p in docx.Document(src.path).paragraphs]
    except Exception as e:  # python-docx raises several types for a corrupt or non-docx file
        raise StageError(f"{src.path}: cannot open as docx ({e.__class__.__name__}: {e})") from None
    try:
        q_start = re.compile(src.question_pattern or QUESTION_START)
        a_start = re.compile(src.answer_pattern or ANSWER_START)
    except re.error as e:
        raise StageError(f"{src.path}: ingest.sources[].question_pattern/answer_pattern: invalid regex ({e})") from None
    info["mapping"] = {"question_pattern": q_start.pattern, "answer_pattern": a_start.pattern}
    blocks, section, block, fresh = [], "", None, True
    for number, text in enumerate(paragraphs, start=1):
        if not text.strip():
            continue
        if SECTION.match(text) and not q_start.match(text):
            section, fresh = text.strip(), True  # numbering may start again
            continue
        m = q_start.match(text)
        qnum = int(d[0]) if m is not None and (d := re.search(r"\d+", m[0])) else None
        # "1." inside an answer or a question (a list, options) is not the next question: that is
        # numbered one more than this one (or unnumbered, like 【问题】)
        if m is not None and (fresh or block is None or qnum is None or block["number"] is None
                              or qnum == block["number"] + 1):
            block = {"row": number, "number": qnum, "question": [text[m.end():]], "answer": None, "section": section}
            blocks.append(block)
            fresh = False
        elif block is not None and block["answer"] is None and (m := a_start.match(text)) is not None:
            block["answer"] = [text[m.end():]]
        elif block is not None:
            block["question" if block["answer"] is None else "answer"].append(text)
    if not blocks:
        raise StageError(f"{src.path}: no question blocks found in {len(paragraphs)} paragraphs "
                         f"(questions start like '1. ...' and answers like '答案：...'; "
                         "set ingest.sources[].question_pattern/answer_pattern)")
    for b in blocks:
        yield b["row"], {"question": check_size("\n".join(b["question"]).strip(), "paragraph text", limit),
                         "answer": check_size("\n".join(b["answer"] or []).strip(), "paragraph text", limit),
                         "section": b["section"]}


def text_lines(src: Source, info: dict) -> list[str]:
    """A text file's lines (a docx file's paragraphs), for multiple-choice blocks."""
    if Path(src.path).suffix.lower() == ".docx":
        import docx

        try:
            return [p.text for p in docx.Document(src.path).paragraphs]
        except Exception as e:  # python-docx raises several types for a corrupt or non-docx file
            raise StageError(f"{src.path}: cannot open as docx ({e.__class__.__name__}: {e})") from None
    text, info["encoding"] = decode(src.path, Path(src.path).read_bytes(), src.encoding)
    if not text.strip():
        raise StageError(f"{src.path}: the file is empty")
    return text.lstrip("\ufeff").splitlines()


def read_text(src: Source, info: dict) -> Iterator[tuple[int, dict]]:
    """A plain-text corpus for continued pretraining: lines packed into chunks of at most
    chunk_chars (a longer line is a chunk of its own), numbered by their first line."""
    text, info["encoding"] = decode(src.path, Path(src.path).read_bytes(), src.encoding)
    if not text.strip():
        raise StageError(f"{src.path}: the file is empty")
    chunk, start, size = [], 1, 0
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if chunk and (size + len(line) > src.chunk_chars or not line.strip()):
            yield start, {"text": "\n".join(chunk)}
            chunk, size = [], 0
        if line.strip():
            if not chunk:
                start = number
            chunk.append(line)
            size += len(line) + 1
    if chunk:
        yield start, {"text": "\n".join(chunk)}


# ----------------------------------------------------------------------------------------------
# Formats: detection, then one row -> (messages, extra keys of the record, meta)
# ----------------------------------------------------------------------------------------------
QUESTION_NAMES = ["question", "questions", "ask", "query", "prompt", "问题", "提问", "问"]
ANSWER_NAMES = ["answer", "answers", "response", "reply", "completion", "回答", "答案", "答"]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "tool", "tool": "tool", "function": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}


def detect_table(src: Source, header: list[str]) -> tuple[str, dict]:
    """The mapping of a table: named in params, or the one obvious question and answer column."""
    lower = {h.casefold(): h for h in header if h}
    if src.format in ("auto", "mcq"):
        choice = mcq.detect_mapping(header, src.question, src.answer, src.options)
        if choice is not None and (src.format == "mcq" or src.options or mcq.option_columns(header)):
            return "mcq", choice
        if src.format == "mcq":
            raise StageError(f"{src.path}: cannot find the question, option (A, B, ...) and answer columns of a "
                             f"multiple-choice table (columns: {', '.join(header)}); set question:, options: "
                             "and answer: for this source in params.yaml ingest.sources")
    if src.question is not None or src.answer is not None:
        if src.question is None or src.answer is None:
            raise StageError(f"{src.path}: set both question and answer columns in ingest.sources (or neither)")
        return "table", {"question": src.question, "answer": src.answer}
    if src.format in ("auto", "alpaca") and "instruction" in lower and "output" in lower:
        return "alpaca", {k: lower[k] for k in ("instruction", "input", "output", "system") if k in lower}
    questions = [lower[n] for n in QUESTION_NAMES if n in lower]
    answers = [lower[n] for n in ANSWER_NAMES if n in lower]
    if len(questions) == 1 and len(answers) == 1:
        return "table", {"question": questions[0], "answer": answers[0]}
    raise StageError(f"{src.path}: cannot tell which columns hold the question and the answer "
                     f"(columns: {', '.join(header)}; candidates: question {questions or 'none'}, answer "
                     f"{answers or 'none'}); set question: and answer: for this source in params.yaml ingest.sources")


def detect_json(src: Source, row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise StageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    k = lambda name: src.fields.get(name, name)  # noqa: E731
    keys = set(row)
    if k("chosen") in keys and k("rejected") in keys:
        return "preference"
    if k("conversations") in keys:
        return "sharegpt"
    if k("messages") in keys:
        return "messages"
    if k("conversation") in keys:
        return "xtuner"
    if k("instruction") in keys and k("output") in keys:
        return "alpaca"
    if k("text") in keys and len(keys - {k("text"), "id", "meta", "source"}) == 0:
        return "text"
    if mcq_mapping(src, row) is not None:
        return "mcq"
    lower = {key.casefold() for key in keys}
    if any(n in lower for n in QUESTION_NAMES) and any(n in lower for n in ANSWER_NAMES):
        return "table"
    raise StageError(f"{where}: cannot detect the format from keys {sorted(keys)} (expected conversations, "
                     "messages, conversation, instruction/output, chosen/rejected or question/answer); "
                     "set format: (and fields: to rename keys) for this source in params.yaml ingest.sources")


def mcq_mapping(src: Source, row: dict) -> dict | None:
    """A JSON object's multiple-choice keys (question, options or A/B/..., answer), renamed by fields:."""
    given = {name: src.fields.get(name) for name in ("question", "options", "answer")}
    return mcq.detect_mapping(list(row), given["question"] or src.question, given["answer"] or src.answer,
                              src.options or given["options"])


def text_field(row: dict, key: str, column: str, limit: int, required: bool = True) -> str:
    if key not in row:
        if required:
            raise RowProblem(column, f"missing (keys present: {', '.join(sorted(map(str, row)))})")
        return ""
    value = row[key]
    if isinstance(value, (dict, list)):
        raise RowProblem(column, f"expected text, got a JSON {type(value).__name__}")
    return check_size(as_text(value), column, limit)


def tool_call(value: str, column: str) -> list[dict]:
    """A function_call turn's JSON ({"name", "arguments"}, or a list of them) as OpenAI tool_calls."""
    try:
        call = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise RowProblem(column, f"a function_call turn must be JSON {{name, arguments}} ({e.msg})") from None
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise RowProblem(column, "a function_call turn must be JSON {name, arguments}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments") if isinstance(
        c.get("arguments"), str) else orjson.dumps(c.get("arguments", {})).decode()}} for c in calls]


def parse_tools(row: dict, key: str) -> list | None:
    if key not in row or row[key] in (None, "", []):
        return None
    tools = row[key]
    if isinstance(tools, str):
        try:
            tools = orjson.loads(tools)
        except orjson.JSONDecodeError as e:
            raise RowProblem(key, f"not valid JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem(key, "expected a list of tool (function) definitions")
    return tools


def react_calls(messages: list[dict]) -> list[dict]:
    """A row with tools: its ReAct assistant turns ("Action: name\\nAction Input: {json}") get the
    call in "tool_calls" as function_call turns do (the text stays in "content")."""
    for m in messages:
        if m["role"] == "assistant" and "tool_calls" not in m and tool_calls.REACT.search(m["content"]):
            call = tool_calls.parse_call(m["content"])
            arguments = call["arguments"]
            arguments = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            m["tool_calls"] = [{"type": "function", "function": {"name": call["name"], "arguments": arguments}}]
    return messages


def turns(row: dict, key: str, sharegpt_keys: tuple[str, str], limit: int) -> list[dict]:
    """ShareGPT turns ({from, value}, named sharegpt_keys) or OpenAI messages ({role, content}) as
    canonical messages. Column names for errors are only built when there is one (this runs for
    every turn of 1M rows)."""
    items = row.get(key)
    if not isinstance(items, list):
        raise RowProblem(key, f"expected a list of turns, got {type(items).__name__ if key in row else 'nothing'}")
    from_key, value_key = sharegpt_keys
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RowProblem(f"{key}[{i}]", f"expected an object, got {type(turn).__name__}")
        if from_key in turn or value_key in turn:
            role_key, content_key, roles = from_key, value_key, SHAREGPT_ROLES
        else:
            role_key, content_key, roles = "role", "content", OPENAI_ROLES
        name = turn.get(role_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise RowProblem(f"{key}[{i}].{role_key}", f"unknown role {name!r} "
                                                       f"(expected one of {', '.join(sorted(roles))})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content is not None and not isinstance(content, (str, int, float)):
                raise RowProblem(f"{key}[{i}].{content_key}", f"expected text, got a JSON {type(content).__name__}")
            content = as_text(content)
        if len(content) > limit:
            check_size(content, f"{key}[{i}].{content_key}", limit)
        message = {"role": role, "content": content}
        if role == "function_call":
            message = {"role": "assistant", "content": content,
                       "tool_calls": tool_call(content, f"{key}[{i}].{content_key}")}
        elif role == "assistant" and isinstance(turn.get("tool_calls"), list):
            message["tool_calls"] = turn["tool_calls"]
            if not content:
                message["content"] = orjson.dumps([c.get("function", c) for c in turn["tool_calls"]]).decode()
        messages.append(message)
    return messages


Converted = tuple[list[dict], dict, dict]  # a row's messages, extra record keys and meta


def converter(fmt: str, src: Source, mapping: dict, limit: int) -> Callable[[dict], Converted]:
    """The function mapping one row of a source to (messages, extra record keys, meta). Key and
    column names are resolved here, once a source, for the function that runs on every row."""
    k = lambda name: src.fields.get(name, name)  # noqa: E731

    def source_system() -> list[dict]:
        """The source's system prompt, as a new message for every row (records share no objects)."""
        return [{"role": "system", "content": src.system}] if src.system else []

    def row_system(row: dict, key: str) -> list[dict]:
        """The row's own system prompt where it has one, else the source's."""
        if row.get(key):
            return [{"role": "system", "content": text_field(row, key, key, limit)}]
        return source_system()

    if src.meta is not None:
        def meta_of(row: dict, used: set) -> dict:
            return {key: (text_field(row, column, column, limit) if fmt == "table" else row[column] if column in row
                          else text_field(row, column, column, limit)) for key, column in src.meta.items()}
    elif fmt == "table":
        def meta_of(row: dict, used: set) -> dict:
            return {key: as_text(value) for key, value in row.items() if key not in used and key}
    else:
        def meta_of(row: dict, used: set) -> dict:
            return {key: value for key, value in row.items() if key not in used and key}

    if fmt == "table":
        qcols = mapping["question"] if isinstance(mapping["question"], list) else [mapping["question"]]
        answer, system_column = mapping["answer"], src.system_column
        used = {*qcols, answer, system_column}

        def convert(row: dict) -> Converted:
            question = "\n".join(t for t in (text_field(row, c, c, limit) for c in qcols) if t.strip())
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": text_field(row, answer, answer, limit)}]
            if system_column:
                system = [{"role": "system", "content": text_field(row, system_column, system_column, limit)}]
            else:
                system = source_system()
            return system + messages, {}, meta_of(row, used)
    elif fmt == "alpaca":
        instruction, input_, output, history_key, system_key = (  # detected table headers, else renamed keys
            mapping.get(name) or k(name) for name in ("instruction", "input", "output", "history", "system"))
        used = {instruction, input_, output, history_key, system_key}

        def convert(row: dict) -> Converted:
            prompt = "\n\n".join(t for t in (text_field(row, instruction, instruction, limit),
                                             text_field(row, input_, input_, limit, required=False)) if t.strip())
            history = []
            for i, pair in enumerate(row.get(history_key) or []):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise RowProblem(f"{history_key}[{i}]", "expected a [question, answer] pair")
                history += [{"role": "user", "content": as_text(pair[0])},
                            {"role": "assistant", "content": as_text(pair[1])}]
            system = row_system(row, system_key)
            messages = history + [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": text_field(row, output, output, limit)}]
            return system + messages, {}, meta_of(row, used)
    elif fmt in ("sharegpt", "messages"):
        key = k("conversations") if fmt == "sharegpt" else k("messages")
        sharegpt_keys, system_key, tools_key = (k("from"), k("value")), k("system"), k("tools")
        used = {key, system_key, tools_key}

        def convert(row: dict) -> Converted:
            messages = turns(row, key, sharegpt_keys, limit)
            system = row_system(row, system_key)
            tools = parse_tools(row, tools_key)
            if tools is None:
                return system + messages, {}, meta_of(row, used)
            return system + react_calls(messages), {"tools": tools}, meta_of(row, used)
    elif fmt == "xtuner":
        conversation = k("conversation")
        used = {conversation}

        def convert(row: dict) -> Converted:
            items = row.get(conversation)
            if not isinstance(items, list):
                raise RowProblem(conversation, "expected a list of {system, input, output} items")
            messages = []
            for i, item in enumerate(items):
                column = f"{conversation}[{i}]"
                if not isinstance(item, dict):
                    raise RowProblem(column, f"expected an object, got {type(item).__name__}")
                if item.get("system"):
                    system = text_field(item, "system", f"{column}.system", limit)
                    messages.append({"role": "system", "content": system})
                messages += [{"role": "user", "content": text_field(item, "input", f"{column}.input", limit)},
                             {"role": "assistant", "content": text_field(item, "output", f"{column}.output", limit)}]
            return source_system() + messages, {}, meta_of(row, used)
    elif fmt == "preference":
        sharegpt_keys, system_key, tools_key = (k("from"), k("value")), k("system"), k("tools")
        chosen_key, rejected_key = k("chosen"), k("rejected")
        turns_keys, prompt_keys = (k("conversations"), k("messages")), (k("prompt"), k("question"), k("instruction"))

        def convert(row: dict) -> Converted:
            key = next((n for n in turns_keys if n in row), None)
            if key is not None:
                messages = turns(row, key, sharegpt_keys, limit)
            else:
                key = next((n for n in prompt_keys if n in row), prompt_keys[0])
                messages = [{"role": "user", "content": text_field(row, key, key, limit)}]
            system = row_system(row, system_key)
            extra: dict = {}
            if (tools := parse_tools(row, tools_key)) is not None:
                extra["tools"] = tools
            chosen, rejected = (preference_answer(row, name, limit) for name in (chosen_key, rejected_key))
            messages = messages + [{"role": "assistant", "content": chosen}]
            extra["rejected"] = {"role": "assistant", "content": rejected}
            if "tools" in extra:
                react_calls([*messages, extra["rejected"]])
            return system + messages, extra, meta_of(row, {key, system_key, tools_key, chosen_key, rejected_key})
    elif fmt == "exam":
        def convert(row: dict) -> Converted:
            messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            return source_system() + messages, {}, {"section": row["section"]} if row["section"] else {}
    elif fmt == "mcq":
        question, options, answer = mapping["question"], mapping["options"], mapping["answer"]
        used = {question, answer, *(options if isinstance(options, list) else [options])}

        def convert(row: dict) -> Converted:
            if isinstance(options, list):
                texts = [text_field(row, c, c, limit, required=False) for c in options]
            else:
                texts = [check_size(t, options, limit) for t in mcq.options_of(row.get(options), options)]
            try:
                messages, extra = mcq.record_parts(text_field(row, question, question, limit), texts,
                                                   text_field(row, answer, answer, limit), answer)
            except mcq.McqProblem as e:
                raise RowProblem(e.column, e.message) from None
            return source_system() + messages, extra, meta_of(row, used)
    elif fmt == "text":
        text_key = k("text")

        def convert(row: dict) -> Converted:
            text = text_field(row, text_key, text_key, limit)
            return [], {"text": text}, {key: row[key] for key in row if key != text_key} if src.meta is None else {}
    else:  # pragma: no cover - Literal in Source
        raise AssertionError(fmt)
    return convert


def preference_answer(row: dict, key: str, limit: int) -> str:
    """chosen / rejected: text, a message, or a list of messages ending in the assistant's."""
    if key not in row:
        raise RowProblem(key, f"missing (keys present: {', '.join(sorted(map(str, row)))})")
    value = row[key]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if isinstance(value, (dict, list)):
        raise RowProblem(key, "expected text or an assistant message")
    return check_size(as_text(value), key, limit)


# ----------------------------------------------------------------------------------------------
# A source, start to end
# ----------------------------------------------------------------------------------------------
def container_of(src: Source) -> str:
    path = Path(src.path)
    if path.is_dir():
        raise StageError(f"{src.path}: is a folder, not a file")
    if not path.exists():
        raise StageError(f"{src.path}: file not found")
    if src.format == "exam":
        return "docx"
    if src.format == "text" and path.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
        return "text"
    container = CONTAINERS.get(path.suffix.lower())
    if container is None:
        raise StageError(f"{src.path}: unsupported file type '{path.suffix}' (supported: {', '.join(sorted(CONTAINERS))})")
    if path.stat().st_size == 0:
        raise StageError(f"{src.path}: the file is empty")
    return container


def open_source(src: Source, limit: int = 100_000, sheet_in_source: bool = False) -> tuple[dict, SourceRecords]:
    """Detect what a source is (returned as a dict, before any record is read) and its records.
    sheet_in_source: name the sheet in each record's source (when one workbook is listed twice)."""
    container = container_of(src)
    info: dict = {"container": container, "encoding": None, "format": src.format, "detected": src.format == "auto",
                  "mapping": {}, "sheet_in_source": sheet_in_source}
    unit, parse = "row", parsed
    if container in ("xlsx", "csv"):
        header, rows = read_xlsx(src, info) if container == "xlsx" else read_csv(src, info, limit)
        fmt, mapping = ("alpaca", {}) if src.format == "alpaca" else detect_table(src, header)
        if src.format not in ("auto", "table", "alpaca", "mcq"):
            raise StageError(f"{src.path}: format '{src.format}' needs JSON; a {container} file is read as a "
                             "table (format: table with question/answer columns, or alpaca)")
        needed = (mapping["question"] if isinstance(mapping.get("question"), list) else [mapping.get("question")]) + [
            mapping.get("answer"), src.system_column, *(src.meta or {}).values(), *(mapping.get("options") or [])]
        if fmt == "alpaca":
            needed = [mapping.get(k) or src.fields.get(k, k) for k in ("instruction", "output")] + [
                mapping.get("input"), *(src.meta or {}).values()]
        for column in filter(None, needed):
            if column not in header:
                close = difflib.get_close_matches(column, header, n=1, cutoff=0.6) or [
                    h for h in header if h.casefold() == column.casefold()]
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise StageError(f"{src.path}: column '{column}' not found (columns: {', '.join(header)}){hint}")
            if header.count(column) > 1:
                raise StageError(f"{src.path}: column '{column}' appears {header.count(column)} times in the header")
        info.update(format=fmt, mapping=mapping)
        if src.meta is None:
            info["mapping"]["meta"] = [h for h in header if h and h not in set(filter(None, needed))]
        else:
            info["mapping"]["meta"] = dict(src.meta)
        parse = functools.partial(table_row, header)
    elif container == "json":
        unit, rows, parse = read_json(src, info)
        if not rows:
            raise StageError(f"{src.path}: no records in the file")
        number, first = rows.first() if isinstance(rows, JsonLines) else rows[0]
        first = parse(number, first)
        fmt = src.format if src.format != "auto" else detect_json(src, first, f"{src.path}: {unit} {number}")
        if fmt == "table":
            header = list(first) if isinstance(first, dict) else []
            fmt, mapping = detect_table(src, header)
            info["mapping"] = mapping
        elif fmt == "mcq":
            info["mapping"] = mcq_mapping(src, first) if isinstance(first, dict) else None
            if info["mapping"] is None:
                raise StageError(f"{src.path}: {unit} {number}: no multiple-choice question, options and answer keys "
                                 f"in {sorted(first) if isinstance(first, dict) else type(first).__name__}; "
                                 "set fields: (e.g. {question: stem, options: choices, answer: label})")
        info["format"] = fmt
    elif src.format == "mcq" or (container == "text" and src.format == "auto"
                                 and mcq.looks_like_blocks(lines := text_lines(src, info))):
        info["format"] = fmt = "mcq"
        lines = text_lines(src, info) if src.format == "mcq" else lines
        unit, rows = ("paragraph" if container == "docx" else "line"), mcq.read_blocks(lines)
        if not rows:
            raise StageError(f"{src.path}: no multiple-choice blocks found ('1. question', 'A. option' lines, "
                             "'answer: B' or '答案：B')")
        info["mapping"] = {"question": "question", "options": "options", "answer": "answer"}
    elif container == "docx":
        info["format"] = fmt = "exam"
        unit, rows = "paragraph", list(read_docx(src, info, limit))
    else:
        info["format"] = fmt = "text"
        unit, rows = "line", list(read_text(src, info))
        info["mapping"] = {"chunk_chars": src.chunk_chars}
    info["unit"] = unit
    if fmt in ("sharegpt", "messages", "alpaca", "xtuner", "preference") and src.fields:
        info["mapping"] = {**info["mapping"], "fields": dict(src.fields)}
    return info, SourceRecords(src, fmt, info, rows, parse, limit)


class SourceRecords:
    """A source's records, in row order. Iterating converts every row (counting into info);
    share(lo, hi, counts) converts the rows of units lo..hi only (rows, or bytes of JSON lines),
    so ingest can spread a large source over worker processes, each counting into its own `counts`."""

    def __init__(self, src: Source, fmt: str, info: dict, rows: list[tuple[int, Any]] | JsonLines,
                 parse: Callable[[int, Any], Any], limit: int):
        self.src, self.fmt, self.info, self.rows, self.parse, self.limit = src, fmt, info, rows, parse, limit
        self.min_share = getattr(rows, "min_share", 20_000)  # units per worker, at least

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return self.share(0, len(self.rows), self.info)

    def share(self, lo: int, hi: int, counts: dict) -> Iterator[dict]:
        counts.update(rows=0, blank_rows=0, rows_with_tools=0)
        rows = self.rows[lo:hi]
        if self.parse is not parsed:  # rows kept raw (table cells, JSON-lines text) are parsed here, in the worker
            rows = ((n, self.parse(n, raw)) for n, raw in rows)
        return records(self.src, self.fmt, self.info, rows, self.limit, counts)


def records(src: Source, fmt: str, info: dict, rows: Iterator[tuple[int, Any]], limit: int,
            counts: dict) -> Iterator[dict]:
    unit, path, sheet_in_source = info["unit"], src.path, info["sheet_in_source"]
    table = info["container"] in ("xlsx", "csv")
    convert = converter(fmt, src, info["mapping"], limit)
    for number, row in rows:
        if not isinstance(row, dict):
            raise StageError(f"{path}: {unit} {number}: expected a JSON object, got {type(row).__name__}")
        if table and all(as_text(v).strip() == "" for v in row.values()):
            counts["blank_rows"] += 1  # an empty spreadsheet row is no data: counted, not a record
            continue
        try:
            messages, extra, meta = convert(row)
        except RowProblem as e:
            raise StageError(f"{path}: {unit} {number}, column '{e.column}': {e.message}") from None
        source = {"file": path, "row": number, "sheet": info["sheet"]} if sheet_in_source else {
            "file": path, "row": number}
        record = {"id": "", "source": source, "messages": messages, "meta": meta, **extra}
        record["id"] = record_id(record)
        counts["rows"] += 1
        counts["rows_with_tools"] += "tools" in extra
        yield record


def describe(info: dict) -> str:
    """One line saying what was detected, for logs and `tunepipe inspect`."""
    parts = [info["container"]]
    if info.get("sheet"):
        parts.append(f"sheet '{info['sheet']}'")
    if info.get("encoding"):
        parts.append(f"encoding {info['encoding']}")
    parts.append(f"format {info['format']}" + (" (detected)" if info["detected"] else "")
                 + (f" with tools in {info['rows_with_tools']} rows" if info.get("rows_with_tools") else ""))
    if info["mapping"]:
        parts.append("mapping " + orjson.dumps(info["mapping"]).decode())
    return ", ".join(parts)


# Records are written a line at a time through a large buffer: no block of lines is joined in memory.
record_line = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)
WRITE_BUFFER = 1 << 20  # bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/ingested/records.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()
    p = load_params("ingest", IngestParams)
    if not p.sources:
        raise StageError("params.yaml: ingest.sources is empty")

    listed = [(src.path, src.sheet) for src in p.sources]
    if len(set(listed)) < len(listed):
        raise StageError("params.yaml: ingest.sources lists the same file (and sheet) twice")
    paths = [path for path, _ in listed]
    infos: dict[str, dict] = {}
    total = 0
    with (no_cycle_collection(), atomic_path(args.out) as tmp, open(tmp, "wb", buffering=WRITE_BUFFER) as out,
          tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".ingest-parts-") as parts_dir):
        for src in p.sources:
            twice = paths.count(src.path) > 1
            info, source_records = open_source(src, p.max_cell_chars, sheet_in_source=twice)
            infos[f"{src.path}#{info.get('sheet')}" if twice else src.path] = info

            def convert_share(lo: int, hi: int) -> tuple[str | None, dict]:
                """Convert rows lo..hi: the first share, which this process converts itself, straight
                into the output; another into a part file to append after it. Returns the part's path
                (None for the first share) and the counts."""
                counts: dict = {}
                records = source_records.share(lo, hi, counts)
                if lo == 0:
                    from tqdm import tqdm  # a progress bar, on a terminal

                    records = tqdm(records, desc=f"ingest {src.path} (first share)", unit=" rows", disable=None,
                                   leave=False, mininterval=0.5)
                    out.writelines(map(record_line, records))
                    return None, counts
                with tempfile.NamedTemporaryFile(dir=parts_dir, delete=False, buffering=WRITE_BUFFER) as part:
                    part.writelines(map(record_line, records))
                return part.name, counts

            # a large source is converted on every core: each worker parses and maps its share
            info.update(rows=0, blank_rows=0, rows_with_tools=0)
            parts = in_forked_shares(len(source_records), convert_share, source_records.min_share)
            for part, counts in parts:
                if part is not None:
                    append_file(out, part)
                for key, n in counts.items():
                    info[key] += n
            if info["rows"] == 0:
                raise StageError(f"{src.path}: no data rows (only a header or blank rows)")
            total += info["rows"]
            print(f"ingest: {src.path}: {info['rows']} rows; {describe(info)}")
    for info in infos.values():
        info.pop("sheet_in_source")
    write_json(args.metrics, {"rows_total": total,
                              "rows_per_source": {path: info["rows"] for path, info in infos.items()},
                              "sources": infos})
    print(f"ingest: {total} rows from {len(infos)} sources -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
