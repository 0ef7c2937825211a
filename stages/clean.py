"""clean: normalise text and drop rows that would teach the model nothing or the wrong thing.

Every rule is switchable in params.yaml `clean`; every dropped row goes to the rejected file with
its reason, so rows in = kept + rejected, in total and for each source. In order:
  1. text fixes (counted, nothing dropped): mojibake (ftfy), Unicode NFKC (full-width spaces, NBSP;
     Chinese full-width punctuation, ①②③, superscripts and fractions kept), HTML tags and entities,
     whitespace, punctuation a turn starts with ("，..."), PII redaction (mainland mobile and
     landline numbers, ID-card numbers, bank cards, emails)
  2. per-row checks: replacement characters (U+FFFD, "锟斤拷"), turn structure, empty turns,
     unfilled template placeholders ({{name}}, <NAME>, [NAME]; filled in step 1 where params give a
     value), placeholder questions and answers, length in characters, domain keywords, identical pairs
  3. exact duplicates (after the fixes), tokens of the base tokenizer (optional)
  4. near-duplicates: MinHash LSH (datasketch) over character n-grams; dropped, or kept and grouped
     so that split never puts one group on both sides
  5. the same question with different answers: always reported (conflicts file); policy in params
  6. an optional LLM judge through any OpenAI-compatible endpoint, cached by content hash
The data card: metrics (counts by source and reason, fixes, redactions, lengths) and
plots/lengths.csv (a histogram of prompt and answer lengths in characters).
How: Arrow reads every record's texts in one multi-threaded pass and polars checks all rows at once
(the rules of step 2 and the keys of steps 3-5 are column expressions); the Python text fixes run
only on texts a regex says a fix might change (a few percent); MinHash signatures and the exact
similarity of near-duplicate candidates come from compiled loops (numba) over the texts' bytes.
Records written unchanged are the bytes that were read.
"""
from __future__ import annotations

import argparse
import functools
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from stages.clean_checks import checked, on_all_cores, token_counts
from stages.clean_dedup import NearDuplicates, conflicting_answers, near_duplicate_groups
from stages.clean_judge import Judge, judge_scores
from stages.clean_placeholders import Placeholders
from stages.clean_text import Pii, TextFixer, may_need_fixing
from stages.common import Params, StageError, atomic_path, load_params, run_stage, stage_enabled, write_json
from stages.columns import line_spans, lines_array, read_table
from stages.records import no_cycle_collection, parse_record, read_file, with_keys, write_lines_to, write_records


class CleanParams(Params):
    normalize_unicode: bool = True      # NFKC: full-width forms, NBSP and the like to plain text
    keep_cjk_punctuation: bool = True   # ...but keep ，：？（） etc., ①②③, superscripts and fractions
    fix_mojibake: bool = True           # UTF-8 read as Latin-1/cp1252 ("Ã©", "ä¸­æ–‡"), via ftfy
    replacement_char: Literal["reject", "strip", "keep"] = "reject"  # U+FFFD: bytes lost before us
    strip_html: bool = True
    collapse_whitespace: bool = True
    strip_leading_punctuation: bool = True  # a turn starting with "，" or "。" (a cut-off sentence)
    placeholder_answers: list[str] = ["No answers", "Unanswerable", "N/A", "无"]
    placeholder_questions: bool = True  # the placeholder list applies to questions too
    min_chars: int = 0                  # characters of the whole conversation (or text chunk)
    max_chars: int | None = None
    min_answer_chars: int = 0
    min_tokens: int = 0                 # tokens of the base tokenizer (loaded only if either is set)
    max_tokens: int | None = None
    tokenizer: str = "models/base"      # the base stage's folder (its manifest names the tokenizer)
    include_keywords: list[str] = []    # keep only rows mentioning one of these (off_domain)
    exclude_keywords: list[str] = []    # drop rows mentioning any of these (excluded_keyword)
    drop_duplicates: bool = True        # exact duplicates after normalisation
    near_duplicates: NearDuplicates = NearDuplicates()
    conflicting_answers: Literal["keep", "keep_first", "drop"] = "keep"  # always reported
    pii: Pii = Pii()
    placeholders: Placeholders = Placeholders()  # {{name}}, <NAME>, [NAME]: filled from values, else rejected
    judge: Judge = Judge()
    # preference pairs (chosen/rejected) while dpo.enabled is false: chosen = train SFT on the chosen
    # answer; reject = reject them (reason preference_without_dpo). With dpo on they are kept for dpo.
    preference: Literal["chosen", "reject"] = "chosen"


MESSAGE = pa.struct([("role", pa.string_view()), ("content", pa.string_view())])
# What clean reads of a canonical record (as string views: polars takes them without a copy);
# other keys (meta, tools, tool_calls, ...) pass through in the line's bytes, and rows with tools
# are parsed (their tools are part of the duplicate key)
RECORD_SCHEMA = pa.schema([("id", pa.string_view()), ("source", pa.struct([("file", pa.string_view()),
                                                                           ("sheet", pa.string_view())])),
                           ("messages", pa.list_(MESSAGE)), ("text", pa.string_view()), ("rejected", MESSAGE)])


LENGTH_BINS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def clean_data(data: bytes, path: str, p: CleanParams, judge_cache: Path | None = None, dpo: bool = False) -> dict:
    """Steps 1-6 over the records of a JSON-lines file's bytes. Returns kept [(row, keys added)],
    rejected [(row, keys added, reason)], line(row) (the row's line, fixed), conflicts, metrics,
    the lengths histogram and seconds by phase."""
    from tqdm import tqdm

    seconds, clock = {}, time.perf_counter()
    progress = tqdm(total=7 + (p.min_tokens > 0 or p.max_tokens is not None), desc="clean", unit=" steps",
                    disable=None, leave=False)  # on a terminal: which step it is on

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        progress.update()
        progress.set_postfix_str(f"{phase.replace('_', ' ')} done")

    starts, ends, numbers = line_spans(data)
    frame = pl.from_arrow(read_table(data, path, numbers, RECORD_SCHEMA)).with_row_index("row")
    n = frame.height
    is_pair = frame["rejected"].is_not_null().to_numpy()
    lap("read")

    # 1. text fixes, in Python, for the rows a fix might change (and rows with tools: a fact needs them)
    pattern = may_need_fixing(p)
    if pattern is not None and n:
        E = pl.element().struct.field("content")
        flagged = frame.select(pl.any_horizontal(
            pl.col("messages").list.eval(E.str.contains(pattern)).list.any(),
            pl.col("text").str.contains(pattern), pl.col("rejected").struct.field("content").str.contains(pattern))
            .fill_null(False)).to_series().to_numpy()
    else:
        flagged = np.zeros(n, dtype=bool)
    if n:
        lines = pl.from_arrow(lines_array(data, starts, ends))
        flagged |= on_all_cores(lines, lambda line: line.bin.contains(b'"tools":')).to_numpy()
    fixer, fixed_lines, lane = TextFixer(p), {}, []
    for k in np.flatnonzero(flagged).tolist():
        record = parse_record(path, data[starts[k]:ends[k]], int(numbers[k]))
        fixed = fixer.record(record)
        if fixed is not record:
            fixed_lines[k] = orjson.dumps(fixed)
        rejected = fixed.get("rejected")
        lane.append({  # the fixed record's columns, as RECORD_SCHEMA has them
            "row": k, "id": fixed["id"], "source": {"file": fixed["source"]["file"], "sheet": fixed["source"].get("sheet")},
            "messages": [{"role": m["role"], "content": m["content"]} for m in fixed["messages"]],
            "text": fixed.get("text"), "rejected": rejected and {"role": rejected["role"], "content": rejected["content"]},
            "tools_json": orjson.dumps(fixed["tools"]).decode() if fixed.get("tools") is not None else None})
    lap("fix")

    # 2. checks and facts, for all rows at once
    frame = frame.filter(~pl.Series(flagged)).with_columns(pl.lit(None, dtype=pl.String).alias("tools_json"))
    if lane:
        schema = RECORD_SCHEMA.insert(0, pa.field("row", pa.int64())).append(pa.field("tools_json", pa.string()))
        fixed_frame = pl.from_arrow(pa.Table.from_pylist(lane, schema=schema))
        facts = pl.concat([checked(frame, p), checked(fixed_frame.cast({"row": frame.schema["row"]}), p)]).sort("row")
    else:
        facts = checked(frame, p)
    frame = None
    lap("check")

    view = memoryview(data)

    def line(i: int) -> bytes | memoryview:
        return fixed_lines.get(i) or view[starts[i]:ends[i]]

    def lines(rows: list[tuple[int, dict | None]]) -> Iterator[bytes | memoryview]:
        """The rows' lines with their keys added, for writing. Rows passed on as they were read,
        one right after the other in the file, go as one piece of it (a few writes, not 1M)."""
        rows_at = np.fromiter((i for i, _ in rows), dtype=np.int64, count=len(rows))
        as_read = np.fromiter((not extra for _, extra in rows), dtype=bool, count=len(rows))
        as_read[np.isin(rows_at, np.fromiter(fixed_lines, dtype=np.int64, count=len(fixed_lines)))] = False
        run_on = as_read[1:] & as_read[:-1] & (starts[rows_at[1:]] == ends[rows_at[:-1]] + 1)
        run_ends = np.flatnonzero(~np.append(run_on, False)).tolist()  # positions where a piece ends
        first = 0
        for last in run_ends:
            i, extra = rows[last]
            if as_read[last]:
                yield view[starts[rows_at[first]]:ends[i]]
            else:
                yield with_keys(line(i), extra)
            first = last + 1

    @functools.lru_cache(maxsize=None)
    def record_of(i: int) -> dict:
        return orjson.loads(line(i))

    def source_of(i: int) -> dict:
        """The record's source. Where it comes before the messages (as ingest writes records), only
        the line's start is parsed: reports name the sources of ~100k rows of 1M."""
        text, lo, hi = (fixed_lines[i], 0, len(fixed_lines[i])) if i in fixed_lines else (data, starts[i], ends[i])
        cut = text.find(b',"messages":', lo, hi)
        try:  # a top-level key's start: the keys before it parse as an object (a nested one's don't)
            source = orjson.loads(text[lo:cut] + b"}").get("source") if cut > lo else None
        except orjson.JSONDecodeError:
            source = None
        return source if isinstance(source, dict) else record_of(i)["source"]

    # 3. exact duplicates (the first of each stays), in file order with the rows that failed a check
    reasons = facts["reason"].to_numpy().astype(object) if n else np.empty(0, dtype=object)
    if p.preference == "reject" and not dpo:  # nothing would train on their rejected answers
        reasons[(reasons == None) & is_pair] = "preference_without_dpo"  # noqa: E711 (elementwise)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if p.drop_duplicates and n:
        firsts = (facts.filter(pl.col("reason").is_null())
                  .select("row", pl.col("row").min().over("duplicate_key").alias("first"))
                  .filter(pl.col("row") != pl.col("first")))
        later = firsts["row"].to_numpy().astype(np.int64)
        duplicate_of[later] = firsts["first"].to_numpy()
        reasons[later] = "duplicate"
    placeholders = facts["placeholder"]

    def why(i: int) -> dict | None:
        """Keys added to rejected row i: what it duplicates, or the placeholder left unfilled."""
        if duplicate_of[i] >= 0:
            return {"duplicate_of": source_of(int(duplicate_of[i]))}
        return {"placeholder": placeholders[i]} if reasons[i] == "unfilled_placeholder" else None

    rejected: list[tuple[int, dict | None, str]] = [
        (i, why(i), reasons[i]) for i in np.flatnonzero(reasons != None).tolist()]  # noqa: E711 (elementwise)
    kept = np.flatnonzero(reasons == None)  # noqa: E711
    added: dict[int, dict] = {}  # keys added to kept row i ("group", "judge_score")
    lap("duplicates")

    def drop(flags: list[str | None], extra: list[dict | None] | None = None) -> None:
        """Move the flagged rows from kept to rejected (extra[k]: keys added to rejected row k)."""
        nonlocal kept
        flagged_at = [k for k, reason in enumerate(flags) if reason]
        for k in flagged_at:
            i = int(kept[k])
            rejected.append((i, {**added.get(i, {}), **(extra[k] or {})} if extra else added.get(i), flags[k]))
        kept = np.delete(kept, flagged_at)

    if len(kept) and (p.min_tokens > 0 or p.max_tokens is not None):  # 3: tokens
        counts = token_counts(facts["token_text"].gather(kept).to_list(), p.tokenizer)
        drop(["too_few_tokens" if c < p.min_tokens else "too_many_tokens" if p.max_tokens is not None
              and c > p.max_tokens else None for c in counts])
        lap("tokens")

    nd = p.near_duplicates
    near_groups = 0
    if nd.enabled and len(kept) > 1:  # 4: near-duplicates
        roots = near_duplicate_groups(facts["near_duplicate_text"].gather(kept).to_arrow(), nd)
        members = np.bincount(roots, minlength=len(roots))
        near_groups = int((members > 1).sum())
        if nd.action == "drop":
            flags, extra = [None] * len(kept), [None] * len(kept)
            for k in np.flatnonzero(roots != np.arange(len(roots))).tolist():
                flags[k], extra[k] = "near_duplicate", {"duplicate_of": source_of(int(kept[roots[k]]))}
            drop(flags, extra)
        else:
            grouped = np.flatnonzero(members[roots] > 1)
            for i, group in zip(kept[grouped].tolist(), facts["id"].gather(kept[roots[grouped]]).to_list()):
                added[i] = {"group": group}
    lap("near_duplicates")

    conflicts, flags = conflicting_answers(facts, kept, record_of, source_of, p.conflicting_answers)  # 5
    drop(flags)
    lap("conflicts")

    judge_stats: Counter = Counter()
    if p.judge.enabled and len(kept):  # 6: the LLM judge
        if judge_cache is None:
            raise StageError("clean.judge is enabled but no cache file was given (--judge-cache)")
        scores = judge_scores([record_of(int(i)) for i in kept], p.judge, judge_cache, judge_stats)
        for i, score in zip(kept.tolist(), scores):
            added[i] = {**added.get(i, {}), "judge_score": score}
        drop(["judge_low_score" if s is not None and s < p.judge.min_score else None for s in scores])
    if judge_cache is not None and not judge_cache.exists():  # a DVC out: there even when the judge is off
        with atomic_path(judge_cache) as tmp:
            tmp.write_bytes(b"")

    metrics, histogram = data_card(facts, kept, rejected, fixer, conflicts, near_groups, judge_stats, p)
    assert metrics["rows_in"] == n, "clean lost rows"
    lap("judge_and_data_card")
    progress.close()
    return {"kept": [(i, added.get(i)) for i in kept.tolist()], "rejected": rejected, "line": line, "lines": lines,
            "conflicts": conflicts, "metrics": metrics, "histogram": histogram, "seconds": seconds}


def data_card(facts: pl.DataFrame, kept: np.ndarray, rejected: list[tuple[int, dict | None, str]], fixer: TextFixer,
              conflicts: list[dict], near_groups: int, judge_stats: Counter, p: CleanParams) -> tuple[dict, list[dict]]:
    """The metrics (counts by source and reason, fixes, redactions, lengths) and the lengths histogram."""
    n = facts.height
    labels = facts["label"].to_list()
    rows_in, kept_by = Counter(labels), Counter(labels[i] for i in kept.tolist())
    rejected_by = defaultdict(Counter)
    for i, _, reason in rejected:
        rejected_by[labels[i]][reason] += 1
    by_source = {label: {"rows_in": count, "rows_kept": kept_by[label], "rows_rejected": sum(rejected_by[label].values()),
                         "rejected_by_reason": dict(sorted(rejected_by[label].items()))}
                 for label, count in sorted(rows_in.items())}
    by_reason = Counter(reason for _, _, reason in rejected)
    lengths = {name: facts[name].to_numpy()[kept] if n else np.zeros(0, dtype=np.int64)
               for name in ("prompt_chars", "answer_chars")}
    metrics = {
        "rows_in": len(kept) + len(rejected), "rows_kept": len(kept), "rows_rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "by_source": by_source,
        "fixes": dict(sorted(fixer.fixes.items())),
        "pii_redacted": dict(sorted(fixer.redactions.items())),
        "conflicting_questions": len(conflicts),
        "conflicting_rows": sum(len(c["rows"]) for c in conflicts),
        "near_duplicate_groups": near_groups,
        "lengths": {name: summary(values) for name, values in lengths.items()},
    }
    if p.judge.enabled:
        metrics["judge"] = dict(judge_stats)
    histogram = [{"chars": edge, "prompt": 0, "answer": 0} for edge in LENGTH_BINS]
    for name, values in lengths.items():
        bins = np.searchsorted(LENGTH_BINS, values, side="right") - 1  # as bisect_right
        for row, count in zip(histogram, np.bincount(bins, minlength=len(LENGTH_BINS)).tolist()):
            row[name.removesuffix("_chars")] = count
    return metrics, histogram


def clean_records(records: Iterable[dict], p: CleanParams, judge_cache: Path | None = None, dpo: bool = False) -> dict:
    """Fix, check and deduplicate records in this process (`tunepipe inspect` and tests), by the
    stage's own code on their JSON lines. Returns kept and rejected records (each rejected one with
    its reason), conflicts (the same question, different answers) and metrics."""
    data = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)
    result = clean_data(data, "records", p, judge_cache, dpo)
    line = result.pop("line")
    result["kept"] = [{**orjson.loads(line(i)), **(extra or {})} for i, extra in result["kept"]]
    result["rejected"] = [{**orjson.loads(line(i)), **(extra or {}), "reason": reason}
                          for i, extra, reason in result["rejected"]]
    return result


def summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"p50": 0, "p90": 0, "max": 0}
    ordered = np.sort(values)
    return {"p50": int(ordered[len(ordered) // 2]), "p90": int(ordered[int(len(ordered) * 0.9)]), "max": int(ordered[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="data/ingested/records.jsonl")
    ap.add_argument("--out", default="data/cleaned/records.jsonl")
    ap.add_argument("--rejected", default="data/cleaned/rejected.jsonl")
    ap.add_argument("--conflicts", default="data/cleaned/conflicts.jsonl")
    ap.add_argument("--judge-cache", default="data/judge/cache.jsonl")
    ap.add_argument("--metrics", default="metrics/clean.json")
    ap.add_argument("--lengths-plot", default="plots/lengths.csv")
    args = ap.parse_args()
    p = load_params("clean", CleanParams)

    with no_cycle_collection():
        result = clean_data(read_file(args.records), args.records, p, Path(args.judge_cache), stage_enabled("dpo"))
        line, clock = result["line"], time.perf_counter()
        write_lines_to(args.out, result["lines"](result["kept"]))
        write_lines_to(args.rejected, (with_keys(line(i), {**(extra or {}), "reason": reason})
                                       for i, extra, reason in result["rejected"]))
        write_records(args.conflicts, result["conflicts"])
        with atomic_path(args.lengths_plot) as tmp:
            tmp.write_text("chars,prompt,answer\n" + "".join(f"{h['chars']},{h['prompt']},{h['answer']}\n"
                                                             for h in result["histogram"]))
        write_json(args.metrics, result["metrics"])
        result["seconds"]["write"] = round(time.perf_counter() - clock, 2)
    m = result["metrics"]
    print(f"clean: kept {m['rows_kept']}, rejected {m['rows_rejected']} {m['rejected_by_reason']}; "
          f"fixes {m['fixes']}; redacted {m['pii_redacted']}; {m['conflicting_questions']} questions with "
          f"conflicting answers -> {args.conflicts}")
    print(f"clean: seconds by phase {result['seconds']}")


if __name__ == "__main__":
    run_stage(main)
