"""What ingest, clean, split (and `tunepipe inspect`) share about canonical records.

A canonical record, one JSON object a line:
  {"id": content hash, "source": {"file", "row"}, "messages": [{"role", "content"}, ...], "meta": {...}}
with optional keys: "tools" (the functions offered, OpenAI style), "rejected" (a preference pair's
rejected assistant message; "messages" ends with the chosen one), "text" (a continued-pretraining
chunk; "messages" is then empty), "mcq" (a multiple-choice question: {"options": [texts in letter
order], "answer": letter}; "messages" asks it with its options and answers with the letter;
stages/mcq.py) and, after clean, "group" (the id of the record it near-duplicates).
Assistant messages that call a tool keep the call as text in "content" (JSON, or ReAct's
"Action:/Action Input:" lines) and structured in "tool_calls" (OpenAI style, arguments as JSON
text); tool results are messages with role "tool". The chat template renders the calls from
"tool_calls" in the family's own format (stages/chat_template.py, `template_messages`).

JSON lines are read and written with orjson (several times faster than json on 1M-row files).
A stage that passes a record on unchanged writes back the line it read. ingest spreads its per-row
work over the cores (in_forked_shares), each worker reading its share of the file's lines where
they lie in its bytes (spans_of_share); clean and split work on columns instead (stages/columns.py).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import mmap
import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

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


def parse_record(path: str | Path, line: bytes, number: int) -> dict:
    """One line of a stage's JSON-lines output as a canonical record."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise StageError(f"{path}: line {number}: invalid JSON ({e})") from None
    if not (isinstance(record, dict) and isinstance(record.get("messages"), list)
            and isinstance(record.get("source"), dict) and "file" in record["source"]):
        raise StageError(f"{path}: line {number}: not a canonical record ({{id, source, messages, meta}})")
    return record


def read_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found (run the previous stage first)")
    return path.read_bytes()


def map_file(path: str | Path) -> bytes | mmap.mmap:
    """read_file's bytes, mapped rather than read: the page cache's copy, read-only (slices are
    bytes). A large file costs no copy, nor the page faults of as much fresh memory."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return read_file(path)  # raises if missing; an empty file can't be mapped
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def line_start(data: bytes, pos: int) -> int:
    """Where the first line that starts at or after byte pos starts (len(data) if none does)."""
    if pos <= 0:
        return 0
    newline = data.find(b"\n", pos - 1)
    return len(data) if newline < 0 else newline + 1


def spans_of_share(data: bytes, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, line number) of the non-blank lines starting at a byte in lo..hi: a worker's
    share of a JSON-lines file, as positions in the file's bytes (nothing copied; orjson parses
    memoryview slices)."""
    pos, stop = line_start(data, lo), line_start(data, min(hi, len(data)))
    number = data.count(b"\n", 0, pos) + 1
    while pos < stop:
        end = data.find(b"\n", pos, stop)
        end = stop if end < 0 else end
        if end > pos and (data[pos] not in b" \t\r\f\v" or data[pos:end].strip()):
            yield pos, end, number
        pos, number = end + 1, number + 1


def read_records(path: str | Path) -> Iterator[dict]:
    """Canonical records from a JSON-lines file written by an earlier stage."""
    data = read_file(path)
    view = memoryview(data)
    return (parse_record(path, view[start:end], number) for start, end, number in spans_of_share(data, 0, len(data)))


def write_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write JSON lines atomically (a killed stage leaves no half-written file); returns the count."""
    return write_lines_to(path, map(orjson.dumps, records))


def with_keys(line: bytes | memoryview, keys: dict | None) -> bytes | memoryview:
    """A record's JSON line with keys added at the end, as {**record, **keys} would be encoded
    (keys a stage adds, such as "reason", which the record does not have yet)."""
    if not keys:
        return line
    line = bytes(line)
    return line[:line.rindex(b"}")] + b"," + orjson.dumps(keys)[1:]


def write_lines_to(path: str | Path, lines: Iterable[bytes | memoryview]) -> int:
    """Write lines (each without its newline) into a new file at path, atomically; returns the count.
    Through a 1 MiB buffer, a line at a time: joining lines into blocks first copied everything once
    more (slow on this VM for clean's runs of lines)."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        write = f.write
        for n, line in enumerate(lines, start=1):
            write(line)
            write(b"\n")
    return n


def append_file(out, path: str | Path) -> None:
    """Append the file at `path` to the open binary file `out` (in the kernel), then delete it."""
    out.flush()
    with open(path, "rb") as part:
        size, offset = os.fstat(part.fileno()).st_size, 0
        while offset < size:
            offset += os.sendfile(out.fileno(), part.fileno(), offset, size - offset)
    os.unlink(path)


T = TypeVar("T")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_forked_shares(n: int, work: Callable[[int, int], T], min_share: int = 20_000) -> list[T]:
    """work(lo, hi) over consecutive shares of range(n), one share per core, shares of at least
    min_share: the parent does the first share while forked children (sharing its memory, copy on
    write) do the others. Results come back pickled, in order. An error in a share is raised here,
    the first share's first, so the earliest bad row is the one reported."""
    processes = max(1, min(cores(), n // max(1, min_share))) if hasattr(os, "fork") else 1
    bounds = [n * k // processes for k in range(processes + 1)]
    children = []
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        out = tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:  # the child: work, write the result, leave at once (no atexit, no pytest teardown)
            code = 0
            try:
                try:
                    result = (True, work(lo, hi))
                except StageError as e:
                    result = (False, e)
                except BaseException:
                    result, code = (False, RuntimeError(traceback.format_exc())), 1
                pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
            finally:
                os._exit(code)
        children.append((pid, out))
    try:
        results = [work(bounds[0], bounds[1])]
    finally:
        statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid, _ in children]
    for (_, out), status in zip(children, statuses):
        out.seek(0)
        try:
            ok, value = pickle.load(out)
        except Exception:
            raise RuntimeError(f"a forked worker exited with status {status} without a result") from None
        if not ok:
            raise value
        results.append(value)
    return results
