"""clean: normalise text and drop rows that would teach the model nothing or the wrong thing.

Every dropped row goes to the rejected file with its reason; rows in = kept + rejected.
"""
from __future__ import annotations

import argparse
import re
import unicodedata
from collections import Counter

from stages.common import Params, content_id, load_params, read_jsonl, run_stage, write_json, write_jsonl


class CleanParams(Params):
    normalize_unicode: bool = True      # NFKC: full-width forms, NBSP and the like to plain text
    collapse_whitespace: bool = True
    placeholder_answers: list[str] = ["No answers", "Unanswerable", "N/A", "无"]
    drop_duplicates: bool = True        # exact duplicates after normalisation


SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def normalize(text: str, p: CleanParams) -> str:
    if p.normalize_unicode:
        text = unicodedata.normalize("NFKC", text)
    if p.collapse_whitespace:
        text = "\n".join(SPACES.sub(" ", line).strip() for line in text.strip().splitlines())
    return text


def rejection(record: dict, placeholders: set[str]) -> str | None:
    """Why a normalised record is unusable for SFT, or None if it is fine."""
    roles = [m["role"] for m in record["messages"]]
    if "user" not in roles or roles[-1] != "assistant":
        return "no_user_assistant_pair"
    if any(not m["content"] for m in record["messages"] if m["role"] in ("user", "assistant")):
        return "empty_turn"
    if record["messages"][-1]["content"].casefold() in placeholders:
        return "placeholder_answer"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="data/ingested/records.jsonl")
    ap.add_argument("--out", default="data/cleaned/records.jsonl")
    ap.add_argument("--rejected", default="data/cleaned/rejected.jsonl")
    ap.add_argument("--metrics", default="metrics/clean.json")
    args = ap.parse_args()
    p = load_params("clean", CleanParams)
    placeholders = {normalize(t, p).casefold() for t in p.placeholder_answers}

    kept, rejected, seen = [], [], {}
    for record in read_jsonl(args.records):
        messages = [{**m, "content": normalize(m["content"], p)} for m in record["messages"]]
        record = {**record, "id": content_id(messages), "messages": messages}
        reason = rejection(record, placeholders)
        if reason is None and p.drop_duplicates and record["id"] in seen:
            reason, record["duplicate_of"] = "duplicate", seen[record["id"]]
        if reason:
            rejected.append({**record, "reason": reason})
        else:
            seen[record["id"]] = record["source"]
            kept.append(record)

    write_jsonl(args.out, kept)
    write_jsonl(args.rejected, rejected)
    by_reason = Counter(r["reason"] for r in rejected)
    metrics = {"rows_in": len(kept) + len(rejected), "rows_kept": len(kept), "rows_rejected": len(rejected),
               "rejected_by_reason": dict(sorted(by_reason.items()))}
    write_json(args.metrics, metrics)
    print(f"clean: kept {len(kept)}, rejected {len(rejected)} {dict(by_reason)}")


if __name__ == "__main__":
    run_stage(main)
