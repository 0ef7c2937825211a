"""split: mix sources, then a seeded train / val / test split, plus the xtuner backend's own format.

Mixing (optional, seeded): a source can be capped (max_rows) or given a share of the mix (e.g. 10%
tool-calling data to keep agent ability); rows left out go to mixed_out.jsonl, counted.
Records that ask the same question (after normalisation) or that clean grouped as
near-duplicates stay in one part, so the test set never scores a question the model was trained
on; the leakage count is a metric and must be 0. Optionally stratified by a field (e.g.
meta.question_type), each stratum split by the same ratios. Continued-pretraining text chunks go
to corpus.jsonl. Every record in is in exactly one output: train, val, test, corpus or mixed_out.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import random
import traceback
from collections import Counter, defaultdict
from pathlib import Path

from stages.common import Params, StageError, load_params, run_stage, write_json
from stages.records import no_cycle_collection, prompt_key, read_records, source_label, write_records


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


def mix(records: list[dict], rules: list[Mix], seed: int) -> tuple[list[dict], list[dict], dict]:
    """Apply caps and shares per source; returns (kept, left out, achieved rows per rule)."""
    rng = random.Random(seed)
    chosen: dict[int, list[int]] = {}
    claimed: set[int] = set()
    for n, rule in enumerate(rules):
        if (rule.max_rows is None) == (rule.share is None):
            raise StageError(f"params.yaml: split.mix[{n}] ({rule.source}): set exactly one of max_rows and share")
        if rule.share is not None and not 0 < rule.share < 1:
            raise StageError(f"params.yaml: split.mix[{n}].share must be between 0 and 1")
        rows = [i for i, r in enumerate(records) if i not in claimed and fnmatch.fnmatch(source_label(r), rule.source)]
        if not rows:
            raise StageError(f"params.yaml: split.mix[{n}]: no cleaned records from '{rule.source}'")
        claimed.update(rows)
        chosen[n] = rows
    others = len(records) - len(claimed)
    keep_rows: set[int] = set(range(len(records))) - claimed
    for n, rule in enumerate(rules):
        rows = chosen[n]
        if rule.max_rows is not None:
            target = min(rule.max_rows, len(rows))
        else:  # share s of the whole: n = s / (1 - s) * (everything else)
            target = min(len(rows), round(rule.share / (1 - rule.share) * (others + sum(
                min(r.max_rows, len(chosen[m])) for m, r in enumerate(rules) if r.max_rows is not None))))
        keep_rows.update(sorted(rng.sample(rows, target)))
    kept = [r for i, r in enumerate(records) if i in keep_rows]
    left = [{**r, "reason": "mixed_out"} for i, r in enumerate(records) if i not in keep_rows]
    achieved = {rule.source: sum(1 for i in chosen[n] if i in keep_rows) for n, rule in enumerate(rules)}
    return kept, left, achieved


def groups_of(records: list[dict], keys: list[str]) -> dict[str, list[dict]]:
    """Records joined by the same prompt or the same near-duplicate group (union-find), keyed by
    the smallest prompt key in the group. keys: each record's prompt_key."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for r, key in zip(records, keys):
        if r.get("group"):
            a, b = root(key), root("\x00group\x00" + r["group"])
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r, key in zip(records, keys):
        groups[root(key)].append(r)
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


def write_xtuner(out: Path, splits: dict[str, list[dict]]) -> None:
    write_records(out / "xtuner" / "train.jsonl", map(to_xtuner, splits["train"]))
    write_records(out / "xtuner" / "val.jsonl", map(to_xtuner, splits["val"]))


def start_forked(work) -> int:
    """Run work() in a forked process (on another core); its pid, for finish_forked()."""
    pid = os.fork()
    if pid == 0:  # the child: work, then leave at once (no atexit handlers, no pytest teardown)
        try:
            work()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return pid


def finish_forked(pid: int, what: str) -> None:
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise StageError(f"split: writing {what} failed")


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
        everything = list(read_records(args.records))
        corpus = [r for r in everything if r.get("text") is not None]
        chats = [r for r in everything if r.get("text") is None]
        chats, mixed_out, achieved = mix(chats, p.mix, p.seed) if p.mix else (chats, [], {})

        prompts = {id(r): prompt_key(r) for r in chats}  # computed once: grouping and leakage use them
        groups = groups_of(chats, list(prompts.values()))
        strata: dict[str, list[str]] = defaultdict(list)
        for key, members in groups.items():
            strata[field(members[0], p.stratify) if p.stratify else ""].append(key)
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
        splits = {name: [r for k in keys for r in groups[k]] for name, keys in parts.items()}
        if min(map(len, splits.values())) == 0:
            raise StageError(f"{args.records}: too few records ({len(chats)}) for a train/val/test split "
                             f"with val_ratio {p.val_ratio} and test_ratio {p.test_ratio}")

        out = Path(args.out)
        # a large split writes xtuner's copies in a forked process, on the second core, meanwhile
        forked = len(chats) >= 100_000 and hasattr(os, "fork")
        child = start_forked(lambda: write_xtuner(out, splits)) if forked else None
        try:
            for name, records in splits.items():
                write_records(out / f"{name}.jsonl", records)
            write_records(out / "corpus.jsonl", corpus)
            write_records(out / "mixed_out.jsonl", mixed_out)
        finally:
            if child is not None:
                finish_forked(child, f"{out / 'xtuner'}")
        if child is None:
            write_xtuner(out, splits)

        # leakage, counted independently of how the split was made
        train_prompts = {prompts[id(r)] for r in splits["train"]}
        train_groups = {r["group"] for r in splits["train"] if r.get("group")}
        leakage = sum(prompts[id(r)] in train_prompts or (r.get("group") in train_groups)
                      for r in splits["test"] + splits["val"])
        assert sum(map(len, splits.values())) + len(corpus) + len(mixed_out) == len(everything), "split lost rows"
        metrics = {**{f"{k}_rows": len(v) for k, v in splits.items()}, "leakage_rows": leakage,
                   "corpus_rows": len(corpus), "mixed_out_rows": len(mixed_out),
                   "rows_per_source": {name: dict(sorted(Counter(source_label(r) for r in v).items()))
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
