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
The containers are read in stages/ingest_readers.py, the formats converted in stages/ingest_formats.py.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import orjson

from stages import mcq
from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json
from stages.ingest_formats import converter, detect_json, detect_table, mcq_mapping
from stages.ingest_readers import (JsonLines, RowProblem, as_text, parsed, read_csv, read_docx, read_json, read_text,
                                   read_xlsx, table_row, text_lines)
from stages.records import append_file, in_forked_shares, no_cycle_collection, record_id

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
