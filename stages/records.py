"""What ingest, clean, split (and `tunepipe inspect`) share about canonical records.

A canonical record, one JSON object a line:
  {"id": content hash, "source": {"file", "row"}, "messages": [{"role", "content"}, ...], "meta": {...}}
with optional keys: "tools" (the functions offered, OpenAI style), "rejected" (a preference pair's
rejected assistant message; "messages" ends with the chosen one), "text" (a continued-pretraining
chunk; "messages" is then empty) and, after clean, "group" (the id of the record it near-duplicates).
Assistant messages that call a tool keep the call as JSON text in "content" (so the chat template
renders it) and structured in "tool_calls"; tool results are messages with role "tool".

JSON lines are read and written with orjson (several times faster than json on 1M-row files).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import orjson

from stages.common import StageError, atomic_path

ROLES = ("system", "user", "assistant", "tool")


def record_id(record: dict) -> str:
    """Stable content hash: the same conversation (and pair, tools, text) gets the same id,
    whatever file or row it came from."""
    body = [[m["role"], m["content"]] for m in record["messages"]]
    extra = [record.get("text"), record.get("tools"), (record.get("rejected") or {}).get("content")]
    if any(x is not None for x in extra):
        body.append(extra)
    return hashlib.sha256(orjson.dumps(body)).hexdigest()[:16]


def prompt_key(record: dict) -> str:
    """What a record asks: its user turns, case-folded. Records with the same prompt key ask the
    same question (clean reports conflicting answers; split keeps them in one part)."""
    if record.get("text") is not None:
        return "\x00text\x00" + record["text"].casefold()
    # casefold maps character by character: one call on the joined turns is the same, and faster
    return "\n".join([m["content"] for m in record["messages"] if m["role"] == "user"]).casefold()


def answer_text(record: dict) -> str:
    """The last assistant turn (the answer), or the text of a corpus chunk."""
    if record.get("text") is not None:
        return record["text"]
    for m in reversed(record["messages"]):
        if m["role"] == "assistant":
            return m["content"]
    return ""


@contextlib.contextmanager
def no_cycle_collection() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a stage holds all its records. Records are
    trees of dicts, lists and strings, with no reference cycles for it to find, yet its passes
    over millions of them cost a stage 10-20% of its time. Memory is still freed as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_records(path: str | Path) -> Iterator[dict]:
    """Canonical records from a JSON-lines file written by an earlier stage."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found (run the previous stage first)")
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise StageError(f"{path}: line {number}: invalid JSON ({e})") from None
            if not (isinstance(record, dict) and isinstance(record.get("messages"), list)
                    and isinstance(record.get("source"), dict) and "file" in record["source"]):
                raise StageError(f"{path}: line {number}: not a canonical record ({{id, source, messages, meta}})")
            yield record


def write_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write JSON lines atomically (a killed stage leaves no half-written file); returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        buffer = []
        for record in records:
            buffer.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            if len(buffer) >= 4096:
                f.write(b"".join(buffer))
                n += len(buffer)
                buffer.clear()
        f.write(b"".join(buffer))
        n += len(buffer)
    return n


def source_label(record: dict) -> str:
    """The input a record came from, as metrics name it: its file (and sheet, where one workbook
    is listed more than once in ingest.sources)."""
    source = record["source"]
    return f"{source['file']}#{source['sheet']}" if "sheet" in source else source["file"]
