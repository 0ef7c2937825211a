"""split: mix sources, then a seeded train / val / test split, plus the xtuner backend's own format.

Mixing (optional, seeded): a source can be capped (max_rows) or given a share of the mix (e.g. 10%
tool-calling data to keep agent ability); rows left out go to mixed_out.jsonl, counted.
Records that ask the same question (after normalisation) or that clean grouped as
near-duplicates stay in one part, so the test set never scores a question the model was trained
on; the leakage count is a metric and must be 0. Optionally stratified by a field (e.g.
meta.question_type), each stratum split by the same ratios. Continued-pretraining text chunks go
to corpus.jsonl. With dpo.enabled, preference pairs (records with `rejected`) go to
preference_{train,test}.jsonl (else they are SFT rows, trained on the chosen answer; the files are
empty). Every record in is in exactly one output: train, val, test, corpus, preference or mixed_out.
Records are written as the bytes clean wrote.
How: Arrow reads the fields split needs from all lines at once; prompt keys and xtuner's lines are
polars column expressions, and groups, strata and parts are numpy arrays of each key's rank in
sorted order (ranks compare as the keys do). Python does only what columns can't: case-folding the
keys str.casefold changes, conversations of unusual shape (tool turns, two user turns in a row),
the seeded shuffles and samples, and a stratify field that is not always text.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from stages.common import Params, StageError, atomic_path, load_params, run_stage, stage_enabled, write_json
from stages.columns import line_spans, lines_array, read_table
from stages.records import map_file, no_cycle_collection, with_keys, write_lines_to


class Mix(Params):
    source: str                         # a source file as in ingest.sources (glob patterns allowed)
    max_rows: int | None = None         # at most this many rows of it (seeded sample)
    share: float | None = None          # its share of the mixed data, 0..1 (downsampled to fit)


class SplitParams(Params):
    seed: int = 42
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    stratify: str | None = None         # a field such as meta.question_type or source.file
    min_stratum: int = 10               # smaller strata are pooled (a stratum of 3 can't be split 80/10/10)
    mix: list[Mix] = []
    # sources (globs, as in ingest.sources) whose rows all go to test: exam papers and tool-call
    # checks that are scored, never trained on
    held_out: list[str] = []


def field(record: dict, path: str) -> str:
    value = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return str(value)


TEXT = pa.string_view()  # polars takes string views without a copy
MESSAGES = pa.list_(pa.struct([("role", TEXT), ("content", TEXT)]))


def record_schema(stratify: str | None) -> pa.Schema | None:
    """What split reads of a record, with the stratify field as text; None where the field's path
    runs into messages, text or group, or ends at an object (whose str() Arrow can't give)."""
    fields = {"source": {"file": TEXT, "sheet": TEXT}, "messages": MESSAGES, "text": TEXT, "group": TEXT,
              "rejected": pa.struct([("role", TEXT), ("content", TEXT)])}
    if stratify:
        *parents, leaf = stratify.split(".")
        node = fields
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return None
        if node.setdefault(leaf, TEXT) is not TEXT:
            return None

    def arrow(node: dict) -> pa.StructType:
        return pa.struct([(k, arrow(v) if isinstance(v, dict) else v) for k, v in node.items()])

    return pa.schema(arrow(fields))


def arrow_ints(values: np.ndarray) -> pa.Int64Array:
    """numpy integers as an Arrow array, without a copy (pa.array would import pandas to look at
    them: a fifth of a second)."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def write_rows(path: Path, rows: np.ndarray, lines: Callable[[np.ndarray], pa.Array]) -> None:
    """Write the rows' lines to a new file, atomically, a few thousand rows at a time (lines(rows):
    an Arrow array of large binary or large strings, each with its newline). Small pieces stay in
    the CPU's caches, and their memory is reused: fresh memory is slow to get."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for lo in range(0, len(rows), 8192):
            piece = lines(rows[lo:lo + 8192])
            offsets = np.frombuffer(piece.buffers()[1], dtype=np.int64)
            f.write(piece.buffers()[2][offsets[0]:offsets[len(piece)]])


@functools.cache
def casefold_changes() -> str:
    """A regex class of the characters str.casefold changes (from Python's own tables)."""
    changed = []
    for lo in range(0, sys.maxunicode + 1, 256):
        block = "".join(map(chr, range(lo, lo + 256)))
        if block.casefold() != block:
            changed += [c for c in range(lo, lo + 256) if chr(c).casefold() != chr(c)]
    return "[" + "".join(f"\\x{{{c:x}}}" for c in changed) + "]"


def casefolded(keys: pl.Series) -> pl.Series:
    """Each key's str.casefold() (records.prompt_key's; polars can only lower-case), by Python for
    the keys it changes."""
    at = keys.str.contains(casefold_changes()).fill_null(False).arg_true()
    return keys.scatter(at, [key.casefold() for key in keys.gather(at).to_list()])


def ranks(values: pl.Series) -> np.ndarray:
    """Each value's rank in sorted order (0, 1, ...; equal values, equal ranks; -1 for null): polars
    sorts strings by their UTF-8 bytes, which is Python's order of str."""
    present = values.is_not_null().to_numpy()
    ranked = np.full(len(values), -1, dtype=np.int64)
    ranked[present] = values.filter(present).rank("dense").to_numpy() - 1
    return ranked


def codes(values: pl.Series) -> tuple[np.ndarray, list[str]]:
    """values as indexes into the list of their distinct values."""
    return ranks(values), values.unique().sort().to_list()


def xtuner_conversations(messages: pl.Series, with_tools: dict[int, dict] | None = None) -> pl.DataFrame:
    """Each row's conversation as to_xtuner makes it: the system prompt (or null) and the turns
    [{input, output}, ...]. Conversations of the usual shape (an optional system prompt, then user
    and assistant turns in turn) are taken apart column-wise, others by to_xtuner, and so are the
    records that offer tools ({row: record}, read whole: `messages` has only roles and contents)."""
    with_tools = with_tools or {}
    flat = pl.from_arrow(messages.to_arrow(compat_level=pl.CompatLevel.newest()).flatten())
    role, content = flat.struct.field("role"), flat.struct.field("content")
    length = messages.list.len().to_numpy().astype(np.int64)
    first = np.cumsum(length) - length
    row_of = np.repeat(np.arange(len(messages)), length)

    def is_role(name: str) -> np.ndarray:
        return (role == name).fill_null(False).to_numpy()

    system = np.zeros(len(messages), dtype=bool)
    system[length > 0] = is_role("system")[first[length > 0]]
    turn = np.arange(len(flat)) - (first + system)[row_of]  # a message's place after the system prompt
    # out of place: not a user message at an even place, not an assistant's at an odd one, no content
    wrong = (turn >= 0) & ~np.where(turn % 2 == 0, is_role("user"), is_role("assistant")) | content.is_null().to_numpy()
    usual = ((length - system) % 2 == 0) & (np.bincount(row_of[wrong], minlength=len(messages)) == 0)
    usual[list(with_tools)] = False

    # the usual rows' turns: each user message (at an even place) and the answer after it
    usual_rows, inputs = np.flatnonzero(usual), np.flatnonzero(usual[row_of] & (turn >= 0) & (turn % 2 == 0))
    turns = pa.StructArray.from_arrays([content.gather(at).to_arrow(compat_level=pl.CompatLevel.newest())
                                        for at in (inputs, inputs + 1)], ["input", "output"])
    turn_offsets = np.concatenate([[0], np.cumsum((length - system)[usual_rows] // 2)])
    conversation = pa.LargeListArray.from_arrays(arrow_ints(turn_offsets), turns)
    system_prompt = pl.repeat(None, len(usual_rows), dtype=pl.String, eager=True).scatter(
        np.flatnonzero(system[usual_rows]), content.gather(first[usual & system]))
    frame = pl.DataFrame({"row": usual_rows, "system": system_prompt, "conversation": pl.from_arrow(conversation)})
    other_rows = np.flatnonzero(~usual)
    if len(other_rows):  # to_xtuner's turns; the system prompt comes out of the first
        converted = [to_xtuner(with_tools.get(row) or {"messages": m})["conversation"]
                     for row, m in zip(other_rows.tolist(), messages.gather(other_rows).to_list())]
        others = pl.DataFrame({"row": other_rows, "system": [c[0].pop("system", None) if c else None for c in converted],
                               "conversation": converted}, schema=frame.schema)
        frame = pl.concat([frame, others]).sort("row")
    return frame.drop("row")


def records_with_tools(lines: pa.LargeBinaryArray) -> dict[int, dict]:
    """{row: record} of the records that offer tools (only the lines that mention them are parsed)."""
    import pyarrow.compute as pc

    mentions = np.flatnonzero(pc.match_substring(lines.cast(pa.large_string()), '"tools":').to_numpy(zero_copy_only=False))
    found = {int(i): orjson.loads(lines[int(i)].as_py()) for i in mentions}
    return {i: record for i, record in found.items() if record.get("tools")}


def xtuner_lines(conversations: pl.DataFrame) -> pa.LargeStringArray:
    """The conversations in xtuner's format, each orjson.dumps(to_xtuner(record)) and a newline:
    polars writes the JSON (its strings are orjson's, byte for byte)."""
    has_system = (pl.col("system") != "") & (pl.col("conversation").list.len() > 0)
    with_system = pl.concat_str([pl.lit('{"conversation":['), pl.struct("system").struct.json_encode().str.head(-1),
                                 pl.lit(","), pl.col("line").str.slice(len('{"conversation":[{'))])
    return (conversations.with_columns(pl.struct("conversation").struct.json_encode().alias("line"))
            .select(pl.concat_str([pl.when(has_system).then(with_system).otherwise(pl.col("line")), pl.lit("\n")]))
            .to_series().to_arrow(compat_level=pl.CompatLevel.oldest()))


class Rows:
    """What split needs of each cleaned record, one array per fact (row i is line i of the file):
    the line (written out as read), whether it is a chat (not a text chunk), source label, prompt
    key and near-duplicate group (as ranks: see groups_of), stratum, and the conversation in
    xtuner's terms (xtuner(rows) gives the rows' lines in its format)."""

    def __init__(self, path: str, stratify: str | None):
        data = map_file(path)
        starts, ends, numbers = line_spans(data)
        self.lines = lines_array(data, starts, ends)
        schema = record_schema(stratify)
        try:
            table = read_table(data, path, numbers, schema or record_schema(None))
        except StageError:
            if schema is None or not stratify:
                raise
            # the stratify field is not always text (a number, an object): Python reads it below
            schema, table = None, read_table(data, path, numbers, record_schema(None))
        frame = pl.from_arrow(table)

        E, source, chat = pl.element(), pl.col("source"), pl.col("text").is_null()
        file, sheet = source.struct.field("file"), source.struct.field("sheet")
        users = pl.col("messages").list.eval(E.filter(E.struct.field("role") == "user").struct.field("content"))
        facts = frame.select(chat.alias("chat"), pl.when(sheet.is_not_null()).then(file + "#" + sheet).otherwise(file)
                             .alias("label"), pl.when(chat).then(users.list.join("\n")).alias("prompt"),
                             pl.when(chat & (pl.col("group") != "")).then("\x00group\x00" + pl.col("group")).alias("group"))
        self.chat = facts["chat"].to_numpy()
        self.preference = frame.select(pl.col("rejected").is_not_null()).to_series().to_numpy()
        self.label, self.labels = codes(facts["label"])
        # prompt keys and group names ranked together: a prompt key equal to a group's name is that group
        keys = ranks(pl.concat([casefolded(facts["prompt"]), facts["group"]]))
        self.prompt, self.group = keys[:len(frame)], keys[len(frame):]
        if not stratify:
            stratum = pl.repeat("", len(frame), eager=True)
        elif schema is not None:  # as field() has it: str(None) for null or missing
            first, *rest = stratify.split(".")
            stratum = functools.reduce(lambda e, part: e.struct.field(part), rest, pl.col(first))
            stratum = frame.select(stratum.fill_null("None")).to_series()
        else:
            stratum = pl.Series([field(orjson.loads(line.as_py()), stratify) for line in self.lines], dtype=pl.String)
        self.stratum, self.strata = codes(stratum)
        self.conversations = xtuner_conversations(frame["messages"], records_with_tools(self.lines))

    def lines_of(self, rows: np.ndarray) -> pa.LargeBinaryArray:
        return self.lines.take(arrow_ints(rows))

    def xtuner(self, rows: np.ndarray) -> pa.LargeStringArray:
        return xtuner_lines(self.conversations[rows])

    def per_source(self, rows: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.label[rows], minlength=len(self.labels))
        return dict(sorted((self.labels[code], int(n)) for code, n in enumerate(counts) if n))


def mix(rows: Rows, chats: np.ndarray, rules: list[Mix], seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Apply caps and shares per source to the chat rows; returns (kept, left out, achieved rows per rule)."""
    rng = random.Random(seed)
    chosen: dict[int, np.ndarray] = {}
    claimed = np.zeros(len(chats), dtype=bool)
    for n, rule in enumerate(rules):
        if (rule.max_rows is None) == (rule.share is None):
            raise StageError(f"params.yaml: split.mix[{n}] ({rule.source}): set exactly one of max_rows and share")
        if rule.share is not None and not 0 < rule.share < 1:
            raise StageError(f"params.yaml: split.mix[{n}].share must be between 0 and 1")
        # positions in `chats`, so the seeded sample is the same whatever else is in the file
        matching = [code for code, label in enumerate(rows.labels) if fnmatch.fnmatch(label, rule.source)]
        members = np.flatnonzero(np.isin(rows.label[chats], matching) & ~claimed)
        if not len(members):
            raise StageError(f"params.yaml: split.mix[{n}]: no cleaned records from '{rule.source}'")
        claimed[members] = True
        chosen[n] = members
    others = len(chats) - int(claimed.sum())
    keep = ~claimed
    for n, rule in enumerate(rules):
        members = chosen[n]
        if rule.max_rows is not None:
            target = min(rule.max_rows, len(members))
        else:  # share s of the whole: n = s / (1 - s) * (everything else)
            target = min(len(members), round(rule.share / (1 - rule.share) * (others + sum(
                min(r.max_rows, len(chosen[m])) for m, r in enumerate(rules) if r.max_rows is not None))))
        keep[rng.sample(members.tolist(), target)] = True
    achieved = {rule.source: int(keep[chosen[n]].sum()) for n, rule in enumerate(rules)}
    return chats[keep], chats[~keep], achieved


def groups_of(rows: Rows, chats: np.ndarray) -> np.ndarray:
    """Each chat row's group: rows joined by the same prompt or the same near-duplicate group
    (union-find), named by the smallest prompt key or group name in it (as its rank)."""
    prompt, group = rows.prompt[chats], rows.group[chats]
    parent = list(range(max(rows.prompt.max(initial=0), rows.group.max(initial=0)) + 1))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    grouped = group >= 0
    for a, b in zip(prompt[grouped].tolist(), group[grouped].tolist()):
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array(parent)
    while not np.array_equal(roots[roots], roots):  # every name straight to its root
        roots = roots[roots]
    return roots[prompt]


def preference_split(rows: Rows, pairs: np.ndarray, p: SplitParams) -> dict[str, np.ndarray]:
    """dpo's pairs: a seeded share test_ratio of their prompts held out (pairs of one prompt stay together)."""
    prompts = np.unique(rows.prompt[pairs]).tolist()
    random.Random(p.seed).shuffle(prompts)
    held_out = np.isin(rows.prompt[pairs], prompts[:round(len(prompts) * p.test_ratio)])
    return {"train": pairs[~held_out], "test": pairs[held_out]}


TOOLS_IN_SYSTEM = ("You may call these functions (JSON definitions, one a line); to call one, answer with "
                   '{"name": <function-name>, "arguments": <args-json-object>}:')


def call_text(calls: list[dict]) -> str:
    """An assistant's tool calls as the JSON {"name", "arguments"} TOOLS_IN_SYSTEM asks for, one a line."""
    out = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            arguments = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        out.append(orjson.dumps({"name": function.get("name"), "arguments": arguments}).decode())
    return "\n".join(out)


def to_xtuner(record: dict) -> dict:
    """xtuner's conversation format: [{system?, input, output}, ...] one item per exchange. It has
    no tools or tool role: the functions offered are written into the system text (after the
    record's own, TOOLS_IN_SYSTEM then one JSON definition a line), a call is the assistant's output
    as JSON (call_text; a ReAct call too; without tools, its content as it is), and a tool result
    is the next exchange's input. (The pipeline's own xtuner backend does not read this file: it
    renders train.jsonl with the base model's template.)"""
    conversation, system, pending = [], "", None
    listed = "\n".join(orjson.dumps(t).decode() for t in record.get("tools") or [])
    for m in record["messages"]:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] in ("user", "tool"):
            pending = m["content"] if pending is None else pending + "\n" + m["content"]
        elif m["role"] == "assistant" and pending is not None:
            turn = {"input": pending, "output": call_text(m["tool_calls"]) if listed and m.get("tool_calls") else m["content"]}
            if listed and not conversation:
                system = f"{system}\n\n{TOOLS_IN_SYSTEM}\n{listed}" if system else f"{TOOLS_IN_SYSTEM}\n{listed}"
            if system and not conversation:
                turn = {"system": system, **turn}
            conversation.append(turn)
            pending = None
    return {"conversation": conversation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="data/cleaned/records.jsonl")
    ap.add_argument("--out", default="data/split")
    ap.add_argument("--metrics", default="metrics/split.json")
    args = ap.parse_args()
    p = load_params("split", SplitParams)
    if not (0 <= p.val_ratio and 0 <= p.test_ratio and 0 < p.val_ratio + p.test_ratio < 1):
        raise StageError("params.yaml: split.val_ratio + split.test_ratio must be between 0 and 1")

    with no_cycle_collection():
        rows = Rows(args.records, p.stratify)
        corpus, chats = np.flatnonzero(~rows.chat), np.flatnonzero(rows.chat)
        # with dpo on, preference pairs are dpo's (not SFT's); with it off, clean kept them for SFT on chosen
        pairs = np.flatnonzero(rows.chat & rows.preference) if stage_enabled("dpo") else chats[:0]
        chats = np.setdiff1d(chats, pairs)
        chats, mixed_out, achieved = mix(rows, chats, p.mix, p.seed) if p.mix else (chats, chats[:0], {})
        held = np.isin(rows.label[chats], [code for code, label in enumerate(rows.labels)
                                           if any(fnmatch.fnmatch(label, g) for g in p.held_out)])
        test_only, chats = chats[held], chats[~held]

        names = groups_of(rows, chats)
        groups, first = np.unique(names, return_index=True)  # each group's name, and its first row
        stratum_of = rows.stratum[chats[first]]
        strata = {rows.strata[s]: groups[stratum_of == s] for s in np.unique(stratum_of).tolist()}
        small = [s for s, keys in strata.items() if len(keys) < p.min_stratum]
        if p.stratify and len(small) > 1:
            strata["(pooled small strata)"] = np.concatenate([strata.pop(s) for s in small])
        parts: dict[str, list[int]] = {"test": [], "val": [], "train": []}
        for stratum in sorted(strata):
            keys = np.sort(strata[stratum]).tolist()
            random.Random(p.seed).shuffle(keys)
            n_test, n_val = round(len(keys) * p.test_ratio), round(len(keys) * p.val_ratio)
            parts["test"] += keys[:n_test]
            parts["val"] += keys[n_test:n_test + n_val]
            parts["train"] += keys[n_test + n_val:]
        # the parts' rows: group after group in the parts' order, a group's rows in file order
        sequence = np.array([name for keys in parts.values() for name in keys], dtype=np.int64)
        place = np.zeros(names.max(initial=-1) + 1, dtype=np.int64)
        place[sequence] = np.arange(len(sequence))
        ordered = chats[np.argsort(place[names], kind="stable")]
        size = np.bincount(names, minlength=len(place))  # rows per group
        splits = dict(zip(parts, np.split(ordered, np.cumsum([size[keys].sum() for keys in parts.values()])[:-1])))
        if min(map(len, splits.values())) == 0:
            raise StageError(f"{args.records}: too few records ({len(chats)}) for a train/val/test split "
                             f"with val_ratio {p.val_ratio} and test_ratio {p.test_ratio}")

        splits["test"] = np.concatenate([splits["test"], test_only])
        out = Path(args.out)
        for name, members in splits.items():
            write_rows(out / f"{name}.jsonl", members, rows.lines_of)
        write_rows(out / "corpus.jsonl", corpus, rows.lines_of)
        preference = preference_split(rows, pairs, p)
        for name, members in preference.items():
            write_rows(out / f"preference_{name}.jsonl", members, rows.lines_of)
        write_lines_to(out / "mixed_out.jsonl", (with_keys(rows.lines[i].as_py(), {"reason": "mixed_out"})
                                                 for i in mixed_out.tolist()))
        for name in ("train", "val"):  # xtuner's own format
            write_rows(out / "xtuner" / f"{name}.jsonl", splits[name], rows.xtuner)

        # leakage, counted independently of how the split was made
        train, held_out = splits["train"], np.concatenate([splits["test"], splits["val"]])
        train_groups = rows.group[train][rows.group[train] >= 0]
        leakage = int((np.isin(rows.prompt[held_out], rows.prompt[train])
                       | np.isin(rows.group[held_out], train_groups)).sum())
        assert sum(map(len, splits.values())) + len(corpus) + len(mixed_out) + len(pairs) == len(rows.lines), \
            "split lost rows"
        metrics = {**{f"{k}_rows": len(v) for k, v in splits.items()}, "leakage_rows": leakage,
                   **{f"preference_{k}_rows": len(v) for k, v in preference.items()},
                   "corpus_rows": len(corpus), "mixed_out_rows": len(mixed_out), "held_out_rows": len(test_only),
                   "rows_per_source": {name: rows.per_source(v) for name, v in splits.items()}}
        if achieved:
            metrics["mix"] = {src: {"rows": n, "share": round(n / max(1, len(chats)), 4)}
                              for src, n in achieved.items()}
        if p.stratify:
            metrics["strata"] = {s: len(keys) for s, keys in sorted(strata.items())}
        write_json(args.metrics, metrics)
        print("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f", corpus {len(corpus)}, "
              f"mixed out {len(mixed_out)}, leakage {leakage}")


if __name__ == "__main__":
    run_stage(main)
