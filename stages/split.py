"""split: seeded train / val / test split, plus the xtuner backend's own training format.

Records that ask the same question (after normalisation) stay in one split, so the test set
never scores a question the model was trained on; the leakage count is a metric and must be 0.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

from stages.common import Params, StageError, load_params, read_jsonl, run_stage, write_json, write_jsonl


class SplitParams(Params):
    seed: int = 42
    val_ratio: float = 0.1
    test_ratio: float = 0.1


def prompt_key(record: dict) -> str:
    return "\n".join(m["content"].casefold() for m in record["messages"] if m["role"] == "user")


def to_xtuner(record: dict) -> dict:
    """xtuner's conversation format: [{system?, input, output}, ...] one item per exchange."""
    conversation, system, pending = [], "", None
    for m in record["messages"]:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            pending = m["content"]
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
    if not 0 < p.val_ratio + p.test_ratio < 1:
        raise StageError("params.yaml: split.val_ratio + split.test_ratio must be between 0 and 1")

    groups = defaultdict(list)
    for record in read_jsonl(args.records):
        groups[prompt_key(record)].append(record)
    keys = sorted(groups)
    random.Random(p.seed).shuffle(keys)
    n_test, n_val = round(len(keys) * p.test_ratio), round(len(keys) * p.val_ratio)
    parts = {"test": keys[:n_test], "val": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}
    splits = {name: [r for k in part for r in groups[k]] for name, part in parts.items()}
    if min(map(len, splits.values())) == 0:
        raise StageError(f"{args.records}: too few records ({sum(map(len, splits.values()))}) for a train/val/test split")

    out = Path(args.out)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    write_jsonl(out / "xtuner" / "train.jsonl", map(to_xtuner, splits["train"]))
    write_jsonl(out / "xtuner" / "val.jsonl", map(to_xtuner, splits["val"]))

    train_prompts = {prompt_key(r) for r in splits["train"]}
    leakage = sum(prompt_key(r) in train_prompts for r in splits["test"] + splits["val"])
    write_json(args.metrics, {**{f"{k}_rows": len(v) for k, v in splits.items()}, "leakage_rows": leakage})
    print(f"split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f", leakage {leakage}")


if __name__ == "__main__":
    run_stage(main)
