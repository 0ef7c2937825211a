"""What clean and split share: a JSON-lines file of canonical records (stages/records.py) read as
columns. line_spans finds the lines, read_table has Arrow's multi-threaded JSON reader read the
fields a stage needs from all of them at once, lines_array gives the lines themselves as an Arrow
array (polars searches them; split writes them out as they were read).
Apart from records.py so that ingest, which works a row at a time, doesn't import numpy and pyarrow.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from stages.common import StageError
from stages.records import parse_record, spans_of_share


def line_spans(data: bytes | mmap.mmap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, line numbers) of the non-blank lines of a JSON-lines file's bytes."""
    buf, newlines = np.frombuffer(data, dtype=np.uint8), []
    for lo in range(0, len(buf), 1 << 24):  # a piece at a time: no file-sized temporary array
        newlines.append(np.flatnonzero(buf[lo:lo + (1 << 24)] == ord("\n")) + lo)
    newlines = np.concatenate(newlines) if newlines else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [len(data)]]).astype(np.int64)
    keep = ends > starts
    for k in np.flatnonzero(keep)[np.isin(buf[starts[keep]], np.frombuffer(b" \t\r\f\v", dtype=np.uint8))]:
        keep[k] = bool(data[starts[k]:ends[k]].strip())  # a line of spaces is blank too
    return starts[keep], ends[keep], np.flatnonzero(keep) + 1


def read_table(data: bytes | mmap.mmap, path: str | Path, numbers: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The columns of `schema` (which has source.file and messages) for every line, by Arrow's
    multi-threaded JSON reader; numbers: the lines' numbers (line_spans), for errors."""
    if not len(numbers):
        return schema.empty_table()
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=16 << 20),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid as e:  # name the first bad line as the line-by-line reader would
        data = bytes(data)  # (a memory map has no count())
        for start, end, number in spans_of_share(data, 0, len(data)):
            parse_record(path, data[start:end], number)
        raise StageError(f"{path}: not canonical records ({e})") from None
    if table.num_rows != len(numbers):
        raise StageError(f"{path}: {table.num_rows} records in {len(numbers)} lines (one record a line)")
    broken = pc.or_(pc.is_null(table["messages"]), pc.is_null(pc.struct_field(table["source"], "file")))
    if pc.any(broken).as_py():
        bad = int(pc.index(broken, True).as_py())
        parse_record(path, b"{}", int(numbers[bad]))  # raises: not a canonical record
    return table


def lines_array(data: bytes | mmap.mmap, starts: np.ndarray, ends: np.ndarray) -> pa.LargeBinaryArray:
    """The lines as an Arrow array, each with its newline: the file's own bytes where its lines
    follow one another (one record a line, a newline at the end), else a copy."""
    if len(starts) and np.array_equal(starts[1:], ends[:-1] + 1) and ends[-1] < len(data):
        offsets = np.append(starts, ends[-1] + 1)
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(starts),
                                                [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.array([data[start:end] + b"\n" for start, end in zip(starts.tolist(), ends.tolist())], pa.large_binary())
