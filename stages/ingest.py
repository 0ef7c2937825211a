"""ingest: read every raw source named in params and map each row to a canonical record.

Canonical record, one JSON object a line (every format in and out converts through it):
  {"id": content hash, "source": {"file", "row"}, "messages": [{"role", "content"}], "meta": {...}}
Nothing is dropped here: empty or odd rows are kept as they are, for clean to judge and count.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal

from stages.common import Params, StageError, content_id, load_params, run_stage, write_json, write_jsonl


class Source(Params):
    path: str
    format: Literal["table", "sharegpt", "messages", "alpaca"]
    sheet: str | None = None                    # table (xlsx): sheet name; default the first
    question: str = "question"                  # table: column holding the user turn
    answer: str = "answer"                      # table: column holding the assistant turn
    system: str | None = None                   # a system prompt for every row of this source
    meta: dict[str, str] = {}                   # table: meta key -> column


class IngestParams(Params):
    sources: list[Source]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def as_text(value) -> str:
    """Cell value to text; NaN/None become "" so clean can report them as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def read_table(src: Source) -> Iterator[tuple[int, dict]]:
    """Rows of an xlsx sheet as {header: value}, numbered as a spreadsheet user sees them."""
    from openpyxl import load_workbook

    try:
        wb = load_workbook(src.path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several types for a corrupt or non-xlsx file
        raise StageError(f"{src.path}: cannot open as xlsx ({e.__class__.__name__}: {e})") from None
    if src.sheet is not None and src.sheet not in wb.sheetnames:
        raise StageError(f"{src.path}: sheet '{src.sheet}' not found (sheets: {', '.join(wb.sheetnames)})")
    rows = (wb[src.sheet] if src.sheet else wb.worksheets[0]).iter_rows(values_only=True)
    header = [as_text(h).strip() for h in next(rows, [])]
    for column in [src.question, src.answer, *src.meta.values()]:
        if column not in header:
            raise StageError(f"{src.path}: column '{column}' not found (columns: {', '.join(header)})")
    for number, values in enumerate(rows, start=2):
        if all(v is None for v in values):
            continue
        yield number, dict(zip(header, values))
    wb.close()


def read_json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """A JSON array or JSON lines, with the line number (or array index + 1) of each object."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), start=1)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None


def to_messages(src: Source, row: dict, where: str) -> tuple[list[dict], dict]:
    system = [{"role": "system", "content": src.system}] if src.system else []
    if src.format == "table":
        messages = [{"role": "user", "content": as_text(row[src.question])},
                    {"role": "assistant", "content": as_text(row[src.answer])}]
        return system + messages, {k: as_text(row[c]) for k, c in src.meta.items()}
    if src.format == "alpaca":
        prompt = "\n\n".join(t for t in (as_text(row.get("instruction")), as_text(row.get("input"))) if t)
        return system + [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": as_text(row.get("output"))}], {}
    if src.format == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise StageError(f"{where}: 'conversations' must be a list")
        if row.get("system"):
            system = [{"role": "system", "content": as_text(row["system"])}]
        messages = []
        for turn in turns:
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise StageError(f"{where}: unknown role '{turn.get('from')}' (expected one of {sorted(SHAREGPT_ROLES)})")
            messages.append({"role": role, "content": as_text(turn.get("value"))})
        return system + messages, {}
    messages = row.get("messages")  # OpenAI messages
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise StageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    return system + [{"role": m["role"], "content": as_text(m.get("content"))} for m in messages], {}


def ingest_source(src: Source) -> Iterator[dict]:
    if not Path(src.path).exists():
        raise StageError(f"{src.path}: file not found (listed in params.yaml ingest.sources)")
    rows = read_table(src) if src.format == "table" else read_json_lines(src.path)
    for number, row in rows:
        where = f"{src.path}: row {number}"
        if not isinstance(row, dict):
            raise StageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages, meta = to_messages(src, row, where)
        yield {"id": content_id(messages), "source": {"file": src.path, "row": number},
               "messages": messages, "meta": meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/ingested/records.jsonl")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()
    p = load_params("ingest", IngestParams)

    records = [record for src in p.sources for record in ingest_source(src)]
    write_jsonl(args.out, records)
    per_source = Counter(r["source"]["file"] for r in records)
    write_json(args.metrics, {"rows_total": len(records), "rows_per_source": dict(per_source)})
    print(f"ingest: {len(records)} rows from {len(per_source)} sources -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
