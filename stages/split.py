"""split: mix sources, then a seeded train / val / test split, plus the xtuner backend's own format.

Mixing (optional, seeded): a source can be capped (max_rows) or given a share of the mix (e.g. 10%
tool-calling data to keep agent ability); rows left out go to mixed_out.jsonl, counted.
Records that ask the same question (after normalisation) or that clean grouped as
near-duplicates stay in one part, so the test set never scores a question the model was trained
on; the leakage count is a metric and must be 0. Optionally stratified by a field (e.g.
meta.question_type), each stratum split by the same ratios. Continued-pretraining text chunks go
to corpus.jsonl. Every record in is in exactly one output: train, val, test, corpus or mixed_out.
Records are written as the bytes clean wrote; a large file is parsed by one worker per core.
"""
from __future__ import annotations

import argparse
import fnmatch
import random
import tempfile
from array import array
from collections import Counter, defaultdict
from pathlib import Path
import orjson

from stages.common import Params, StageError, load_params, run_stage, write_json
from stages.records import (Lines, in_forked_shares, no_cycle_collection, parse_record, prompt_key, read_file,
                            shown, source_label, spans_of_share, with_keys, write_lines_to)


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


def field(record: dict, path: str) -> str:
    value = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return str(value)


class Rows:
    """What split needs of each cleaned record, one list per fact (row i is line i of the file):
    the line (written out as read), source label, prompt key, near-duplicate group, stratum and
    the line in xtuner's format. Records are parsed in worker processes, one share of the file
    each; the lines stay where they are in the file's bytes, xtuner's lines in a part file per
    worker, and only positions and the short facts come back."""

    def __init__(self, path: str, stratify: str | None, parts: str):
        data = read_file(path)

        def facts(lo: int, hi: int) -> tuple[array, array, list[tuple], str, array]:
            starts, ends, out, same = array("q"), array("q"), [], {}  # same: one object per label or stratum
            view, xtuner_ends = memoryview(data), array("q")
            with tempfile.NamedTemporaryFile(dir=parts, delete=False) as xtuner:
                for start, end, number in shown(spans_of_share(data, lo, hi), lo, hi, "split"):
                    record = parse_record(path, view[start:end], number)
                    starts.append(start)
                    ends.append(end)
                    label = source_label(record)
                    label = same.setdefault(label, label)
                    if record.get("text") is not None:
                        out.append((label, None, None, None))
                    else:
                        stratum = field(record, stratify) if stratify else ""
                        out.append((label, prompt_key(record), record.get("group") or None,
                                    same.setdefault(stratum, stratum)))
                        xtuner.write(orjson.dumps(to_xtuner(record)))
                    xtuner_ends.append(xtuner.tell())  # a text chunk has no xtuner line: an empty span
            return starts, ends, out, xtuner.name, xtuner_ends

        shares = in_forked_shares(len(data), facts, min_share=8_000_000)
        self.lines = Lines(data, (x for share in shares for x in share[0]), (x for share in shares for x in share[1]))
        rows = [row for share in shares for row in share[2]]
        self.label, self.prompt, self.group, self.stratum = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
        # xtuner lines: spans in the workers' part files, one after the other
        parts_read = [Path(share[3]).read_bytes() for share in shares]
        offsets = [sum(map(len, parts_read[:k])) for k in range(len(shares))]
        xtuner_ends = array("q", (offset + end for offset, share in zip(offsets, shares) for end in share[4]))
        xtuner_starts = array("q", [0]) + xtuner_ends[:-1] if xtuner_ends else array("q")
        self.xtuner = Lines(b"".join(parts_read), xtuner_starts, xtuner_ends)


def mix(rows: Rows, chats: list[int], rules: list[Mix], seed: int) -> tuple[list[int], list[int], dict]:
    """Apply caps and shares per source to the chat rows; returns (kept, left out, achieved rows per rule)."""
    rng = random.Random(seed)
    chosen: dict[int, list[int]] = {}
    claimed: set[int] = set()
    for n, rule in enumerate(rules):
        if (rule.max_rows is None) == (rule.share is None):
            raise StageError(f"params.yaml: split.mix[{n}] ({rule.source}): set exactly one of max_rows and share")
        if rule.share is not None and not 0 < rule.share < 1:
            raise StageError(f"params.yaml: split.mix[{n}].share must be between 0 and 1")
        # positions in `chats`, so the seeded sample is the same whatever else is in the file
        members = [k for k, i in enumerate(chats) if k not in claimed and fnmatch.fnmatch(rows.label[i], rule.source)]
        if not members:
            raise StageError(f"params.yaml: split.mix[{n}]: no cleaned records from '{rule.source}'")
        claimed.update(members)
        chosen[n] = members
    others = len(chats) - len(claimed)
    keep: set[int] = set(range(len(chats))) - claimed
    for n, rule in enumerate(rules):
        members = chosen[n]
        if rule.max_rows is not None:
            target = min(rule.max_rows, len(members))
        else:  # share s of the whole: n = s / (1 - s) * (everything else)
            target = min(len(members), round(rule.share / (1 - rule.share) * (others + sum(
                min(r.max_rows, len(chosen[m])) for m, r in enumerate(rules) if r.max_rows is not None))))
        keep.update(sorted(rng.sample(members, target)))
    kept = [i for k, i in enumerate(chats) if k in keep]
    left = [i for k, i in enumerate(chats) if k not in keep]
    achieved = {rule.source: sum(1 for k in chosen[n] if k in keep) for n, rule in enumerate(rules)}
    return kept, left, achieved


def groups_of(rows: Rows, chats: list[int]) -> dict[str, list[int]]:
    """Rows joined by the same prompt or the same near-duplicate group (union-find), keyed by
    the smallest prompt key in the group."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i in chats:
        if rows.group[i]:
            a, b = root(rows.prompt[i]), root("\x00group\x00" + rows.group[i])
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[str, list[int]] = defaultdict(list)
    for i in chats:
        groups[root(rows.prompt[i])].append(i)
    return groups


def to_xtuner(record: dict) -> dict:
    """xtuner's conversation format: [{system?, input, output}, ...] one item per exchange.
    A tool result is the next exchange's input (xtuner's format has no tool role)."""
    conversation, system, pending = [], "", None
    for m in record["messages"]:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] in ("user", "tool"):
            pending = m["content"] if pending is None else pending + "\n" + m["content"]
        elif m["role"] == "assistant" and pending is not None:
            turn = {"input": pending, "output": m["content"]}
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
        with tempfile.TemporaryDirectory(prefix="tunepipe-split-") as parts:
            rows = Rows(args.records, p.stratify, parts)
        corpus = [i for i, prompt in enumerate(rows.prompt) if prompt is None]
        chats = [i for i, prompt in enumerate(rows.prompt) if prompt is not None]
        chats, mixed_out, achieved = mix(rows, chats, p.mix, p.seed) if p.mix else (chats, [], {})

        groups = groups_of(rows, chats)
        strata: dict[str, list[str]] = defaultdict(list)
        for key, members in groups.items():
            strata[rows.stratum[members[0]]].append(key)
        small = [s for s, keys in strata.items() if len(keys) < p.min_stratum]
        if p.stratify and len(small) > 1:
            strata["(pooled small strata)"] = [k for s in small for k in strata.pop(s)]
        parts: dict[str, list[str]] = {"test": [], "val": [], "train": []}
        for stratum in sorted(strata):
            keys = sorted(strata[stratum])
            random.Random(p.seed).shuffle(keys)
            n_test, n_val = round(len(keys) * p.test_ratio), round(len(keys) * p.val_ratio)
            parts["test"] += keys[:n_test]
            parts["val"] += keys[n_test:n_test + n_val]
            parts["train"] += keys[n_test + n_val:]
        splits = {name: [i for k in keys for i in groups[k]] for name, keys in parts.items()}
        if min(map(len, splits.values())) == 0:
            raise StageError(f"{args.records}: too few records ({len(chats)}) for a train/val/test split "
                             f"with val_ratio {p.val_ratio} and test_ratio {p.test_ratio}")

        out = Path(args.out)
        for name, members in splits.items():
            write_lines_to(out / f"{name}.jsonl", (rows.lines[i] for i in members))
        write_lines_to(out / "corpus.jsonl", (rows.lines[i] for i in corpus))
        write_lines_to(out / "mixed_out.jsonl", (with_keys(rows.lines[i], {"reason": "mixed_out"}) for i in mixed_out))
        for name in ("train", "val"):  # xtuner's own format
            write_lines_to(out / "xtuner" / f"{name}.jsonl", (rows.xtuner[i] for i in splits[name]))

        # leakage, counted independently of how the split was made
        train_prompts = {rows.prompt[i] for i in splits["train"]}
        train_groups = {rows.group[i] for i in splits["train"] if rows.group[i]}
        leakage = sum(rows.prompt[i] in train_prompts or (rows.group[i] in train_groups)
                      for i in splits["test"] + splits["val"])
        assert sum(map(len, splits.values())) + len(corpus) + len(mixed_out) == len(rows.lines), "split lost rows"
        metrics = {**{f"{k}_rows": len(v) for k, v in splits.items()}, "leakage_rows": leakage,
                   "corpus_rows": len(corpus), "mixed_out_rows": len(mixed_out),
                   "rows_per_source": {name: dict(sorted(Counter(rows.label[i] for i in v).items()))
                                       for name, v in splits.items()}}
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
