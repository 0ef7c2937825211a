"""ingest's readers: bytes to text, and each container to numbered rows.

Containers: xlsx (any sheet; python-calamine), csv/tsv in any encoding (BOM, UTF-8, else
charset-normalizer: GB18030/GBK, Big5, ...), JSON arrays, JSON lines (also in ".json" files),
docx exam papers (question and answer blocks; python-docx) and plain-text corpora. Each reader
takes a source (stages/ingest.py's Source) and the info dict it fills in (encoding, sheet, ...);
every cell passes check_size. stages/ingest_formats.py maps the rows to records.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import orjson

from stages.common import StageError
from stages.records import spans_of_share

if TYPE_CHECKING:
    from stages.ingest import Source


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
