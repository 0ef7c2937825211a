"""clean: normalise text and drop rows that would teach the model nothing or the wrong thing.

Every rule is switchable in params.yaml `clean`; every dropped row goes to the rejected file with
its reason, so rows in = kept + rejected, in total and for each source. In order:
  1. text fixes (counted, nothing dropped): mojibake (ftfy), Unicode NFKC (full-width spaces, NBSP;
     Chinese full-width punctuation, ①②③, superscripts and fractions kept), HTML tags and entities,
     whitespace, punctuation a turn starts with ("，..."), PII redaction (mainland mobile and
     landline numbers, ID-card numbers, bank cards, emails)
  2. per-row checks: replacement characters (U+FFFD, "锟斤拷"), turn structure, empty turns,
     placeholder questions and answers, length in characters, domain keywords, identical pairs
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
import hashlib
import time
import html
import os
import re
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numba
import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json
from stages.columns import line_spans, lines_array, read_table
from stages.records import (no_cycle_collection, parse_record, prompt_key, read_file, record_id,
                            with_keys, write_lines_to, write_records)

# ----------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------
DEFAULT_JUDGE_PROMPT = (
    "You grade training data for a domain assistant. Rate how correct, helpful and safe the "
    "assistant's answer is, from 1 (useless or wrong) to 10 (excellent). Reply with the number only.\n\n"
    "{conversation}")


class NearDuplicates(Params):
    enabled: bool = True
    threshold: float = 0.85             # estimated Jaccard similarity of character n-gram sets
    ngram: int = 5
    num_perm: int = 64                  # MinHash permutations (more: better estimates, slower)
    action: Literal["drop", "group"] = "drop"   # group: keep all, split keeps each group together
    seed: int = 1


class Pii(Params):
    enabled: bool = True
    kinds: list[Literal["mobile", "landline", "id_card", "bank_card", "email"]] = [
        "mobile", "landline", "id_card", "bank_card", "email"]
    action: Literal["redact", "reject"] = "redact"


class Judge(Params):
    enabled: bool = False
    url: str = "http://127.0.0.1:8000/v1"   # any OpenAI-compatible API; /chat/completions is appended
    model: str = ""
    api_key_env: str = "TUNEPIPE_JUDGE_API_KEY"  # the key comes from this environment variable only
    prompt: str = DEFAULT_JUDGE_PROMPT      # {conversation} is replaced by the rendered conversation
    min_score: float = 6.0                  # rows scored below are rejected (judge_low_score)
    max_workers: int = 4
    timeout_s: float = 60.0
    retries: int = 2


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
    judge: Judge = Judge()


# ----------------------------------------------------------------------------------------------
# 1. text fixes: each returns the new text; a cheap search first, so clean text costs little
# ----------------------------------------------------------------------------------------------
KEEP = "".join(chr(c) for c in [*range(0xFF01, 0xFF10), *range(0xFF1A, 0xFF21), *range(0xFF3B, 0xFF41),
                                *range(0xFF5B, 0xFF61), 0xB2, 0xB3, 0xB9, *range(0x2070, 0x20A0),
                                *range(0xBC, 0xBF), *range(0x2150, 0x2160), *range(0x2460, 0x2500),
                                *range(0x3251, 0x3260), *range(0x32B1, 0x32C0)])


@functools.cache  # a scan of the whole BMP: once per process, not once per TextFixer
def compat_chars(keep: str) -> str:
    """The characters that NFKC changes (BMP), except those in `keep`, as a regex class body."""
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000 and chr(c) not in keep
             and unicodedata.normalize("NFKC", chr(c)) != chr(c)]
    return "".join(re.escape(c) for c in chars)


@functools.cache
def compat_class(keep: str) -> re.Pattern:
    """Runs of characters that NFKC changes (BMP), except those in `keep`."""
    return re.compile("[" + compat_chars(keep) + "]+")


MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                      "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
HTML_TAG = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>|</?(?:p|br|div|span|a|b|i|u|em|strong|ul|ol|li"
                      r"|table|thead|tbody|tr|td|th|h[1-6]|img|font|sup|sub|hr|pre|code|blockquote|center|small|big"
                      r"|section|article|header|footer|nav|label|dl|dt|dd)(?:\s[^<>]*)?/?>", re.I | re.S)
HTML_BLOCK = re.compile(r"</?(?:p|br|div|li|tr|h[1-6]|table|ul|ol|pre|blockquote|hr|dd|dt)\b", re.I)
HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z][a-z0-9]{1,31});", re.I)
WS_ODD_CHARS = (r"\t\r\f\v\u00a0\u1680\u2000-\u200d\u2028\u2029\u202f\u205f\u2060\u3000\ufeff"
                r"\x00-\x08\x0b-\x1f\x7f-\x9f")
WS_ODD = re.compile(f"[{WS_ODD_CHARS}]")
SPACES = re.compile(r"[ \t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
LEADING_PUNCT = re.compile(r"^[，,。.、；;：:？?）)\s]+(?=\S)")  # what no sentence starts with
BROKEN = re.compile("\ufffd|锟斤拷|烫烫烫|屯屯屯")

PII_PATTERNS = {
    "email": (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "[EMAIL]"),
    "id_card": (r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                r"(?![0-9A-Za-z])", "[ID_CARD]"),
    "bank_card": (r"(?<![0-9A-Za-z])[1-9]\d{15,18}(?![0-9A-Za-z])", "[BANK_CARD]"),
    "mobile": (r"(?<![0-9A-Za-z])(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?![0-9A-Za-z])", "[PHONE]"),
    "landline": (r"(?<![0-9A-Za-z])(?:\(0\d{2,3}\)|0\d{2,3}-)\d{7,8}(?![0-9A-Za-z])", "[PHONE]"),
}
PII_HINT = re.compile(r"[0-9][0-9][0-9][0-9 -][0-9][0-9][0-9]")  # or "@": nothing to redact without one


def id_card_ok(number: str) -> bool:
    """GB 11643 check digit of a mainland resident ID number."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(number, weights)) % 11] == number[-1].upper()


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number][::-1]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def odd_chars(p: CleanParams) -> str:
    """A regex class body: the characters mojibake, NFKC or odd whitespace would start with."""
    odd = ("\u00c2-\u00f4" if p.fix_mojibake else "") + (WS_ODD_CHARS if p.collapse_whitespace else "")
    return odd + (compat_chars(KEEP if p.keep_cjk_punctuation else "") if p.normalize_unicode else "")


class TextFixer:
    """The text fixes of step 1, configured once; counts what each one changed."""

    def __init__(self, p: CleanParams):
        self.p = p
        self.compat = compat_class(KEEP if p.keep_cjk_punctuation else "") if p.normalize_unicode else None
        self.fixes: Counter = Counter()
        self.redactions: Counter = Counter()
        kinds = [k for k in PII_PATTERNS if k in p.pii.kinds] if p.pii.enabled else []
        self.pii = re.compile("|".join(f"(?P<{k}>{PII_PATTERNS[k][0]})" for k in kinds)) if kinds else None
        # One scan for a character that mojibake, NFKC or odd whitespace would start with: one
        # regex pass instead of three, and the rules' own checks only if needed
        self.odd = re.compile(f"[{odd}]") if (odd := odd_chars(p)) else None

    def text(self, text: str) -> str:
        p, before = self.p, text
        odd = self.odd is not None and self.odd.search(text) is not None
        if p.fix_mojibake and odd and MOJIBAKE.search(text):
            import ftfy

            text = ftfy.fix_encoding(text)
            if text != before:
                self.fixes["mojibake"] += 1
        if self.compat is not None and ((odd and self.compat.search(text)) or not unicodedata.is_normalized("NFC", text)):
            fixed = unicodedata.normalize("NFC", self.compat.sub(lambda m: unicodedata.normalize("NFKC", m[0]), text))
            if fixed != text:
                self.fixes["unicode"] += 1
                text = fixed
        if p.strip_html and ("<" in text or "&" in text):
            fixed = HTML_TAG.sub(lambda m: "\n" if HTML_BLOCK.match(m[0]) else "", text)
            fixed = html.unescape(fixed) if HTML_ENTITY.search(fixed) else fixed
            if fixed != text:
                self.fixes["html"] += 1
                text = fixed
                odd = self.odd is not None and self.odd.search(text) is not None  # "&nbsp;" is odd now
        if p.replacement_char == "strip" and "\ufffd" in text:
            self.fixes["replacement_char_stripped"] += 1
            text = text.replace("\ufffd", "")
        if p.collapse_whitespace and ((odd and WS_ODD.search(text)) or "  " in text or " \n" in text or "\n " in text
                                      or "\n\n\n" in text or text[:1].isspace() or text[-1:].isspace()):
            fixed = INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
            fixed = "\n".join(SPACES.sub(" ", line).strip() for line in fixed.strip().split("\n"))
            fixed = re.sub(r"\n{3,}", "\n\n", fixed)
            if fixed != text:
                self.fixes["whitespace"] += 1
                text = fixed
        if p.strip_leading_punctuation and text and text[0] in "，,。.、；;：:？?）) " and (m := LEADING_PUNCT.match(text)):
            if not text.startswith(("...", "..")):
                self.fixes["leading_punctuation"] += 1
                text = text[m.end():]
        if self.pii is not None and ("@" in text or PII_HINT.search(text)):  # twice as fast as one regex
            text = self.pii.sub(self.redact, text)
        return text

    def redact(self, m: re.Match) -> str:
        kind, value = m.lastgroup, m[0]
        if kind == "id_card" and not id_card_ok(value):
            return value
        if kind == "bank_card" and not luhn_ok(value):
            return value
        self.redactions[kind] += 1
        return PII_PATTERNS[kind][1]

    def record(self, record: dict) -> dict:
        """The record with every text fixed (a new dict if anything changed, and a new id)."""
        changed = False
        messages = []
        for m in record["messages"]:
            content = self.text(m["content"])
            if content != m["content"]:
                changed = True
                if "tool_calls" in m and self.pii is not None:
                    m = {**m, "tool_calls": orjson.loads(self.pii.sub(self.redact, orjson.dumps(m["tool_calls"]).decode()))}
                m = {**m, "content": content}
            messages.append(m)
        rejected = record.get("rejected")
        if rejected is not None and (fixed := self.text(rejected["content"])) != rejected["content"]:
            changed, rejected = True, {**rejected, "content": fixed}
        text = record.get("text")
        if text is not None and (fixed := self.text(text)) != text:
            changed, text = True, fixed
        if not changed:
            return record
        record = {**record, "messages": messages}
        if rejected is not None:
            record["rejected"] = rejected
        if text is not None:
            record["text"] = text
        record["id"] = record_id(record)
        return record


# ----------------------------------------------------------------------------------------------
# 2. per-row checks and the facts later steps need: column expressions (polars) over all rows
# ----------------------------------------------------------------------------------------------
MESSAGE = pa.struct([("role", pa.string_view()), ("content", pa.string_view())])
# What clean reads of a canonical record (as string views: polars takes them without a copy);
# other keys (meta, tools, tool_calls, ...) pass through in the line's bytes, and rows with tools
# are parsed (their tools are part of the duplicate key)
RECORD_SCHEMA = pa.schema([("id", pa.string_view()), ("source", pa.struct([("file", pa.string_view()),
                                                                           ("sheet", pa.string_view())])),
                           ("messages", pa.list_(MESSAGE)), ("text", pa.string_view()), ("rejected", MESSAGE)])
PII_TAGS = ["[PHONE]", "[ID_CARD]", "[EMAIL]", "[BANK_CARD]"]


@functools.cache
def maybe_not_nfc_chars() -> str:
    """BMP characters without which a text is NFC already: combining marks, characters NFC
    replaces, and the later characters of canonical decompositions (Hangul vowels among them)."""
    chars = set()
    for c in range(0x10000):
        if 0xD800 <= c < 0xE000:
            continue
        ch = chr(c)
        if unicodedata.combining(ch) or unicodedata.normalize("NFC", ch) != ch:
            chars.add(ch)
        chars.update(unicodedata.normalize("NFD", ch)[1:])
    return "".join(re.escape(c) for c in sorted(chars))


def may_need_fixing(p: CleanParams) -> str | None:
    """A regex (polars syntax) matching every text TextFixer.text might change. Texts it does not
    match (almost all) skip the Python fixes; tests/test_data_stages.py checks the promise."""
    parts = [f"[{odd}]"] if (odd := odd_chars(p)) else []
    if p.normalize_unicode:
        parts.append(f"[{maybe_not_nfc_chars()}\U00010000-\U0010FFFF]")
    if p.strip_html:
        parts.append("[<&]")
    if p.replacement_char == "strip":
        parts.append("\ufffd")
    if p.collapse_whitespace:
        parts += ["  ", " \n", "\n ", "\n\n\n", r"^\s", r"\s$"]
    if p.strip_leading_punctuation:
        parts.append("^[，,。.、；;：:？?）) ]")
    if p.pii.enabled and p.pii.kinds:
        parts += ["@", PII_HINT.pattern]
    return "|".join(parts) or None


def placeholder(text: str) -> str:
    return text.strip().rstrip(".。!！ ").casefold()


def placeholder_regex(texts: Iterable[str]) -> str | None:
    """A regex (polars syntax) for texts that placeholder() maps to one of `texts`."""
    alternatives = "|".join("".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in t) for t in texts if t)
    return f"^\\s*(?i:{alternatives})[.。!！ ]*\\s*$" if alternatives else None


def with_folded(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with its texts lower-cased beside them: folded_turns (messages as [{role, folded}])
    and text_folded. The keys of duplicates and questions compare case-folded text."""
    messages = as_array(frame["messages"].to_arrow(compat_level=pl.CompatLevel.newest()))  # views stay views
    turns = messages.values
    folded = as_array(lower_cased(pl.from_arrow(turns.field("content"))).to_arrow(compat_level=pl.CompatLevel.newest()))
    turns = pa.StructArray.from_arrays([turns.field("role"), folded], ["role", "folded"])
    return frame.with_columns(pl.from_arrow(type(messages).from_arrays(messages.offsets, turns)).alias("folded_turns"),
                              lower_cased(frame["text"]).alias("text_folded"))


def lower_cased(texts: pl.Series) -> pl.Series:
    """texts.str.to_lowercase(), lowering only the texts with a character that lower-casing changes:
    polars lowers a CJK text as slowly as any other, and most of them have none."""
    # unassigned (Cn) too: characters newer than the regex tables, which to_lowercase may know
    cased = on_all_cores(texts, lambda t: t.str.contains(r"[\p{Changes_When_Lowercased}\p{Cn}]").fill_null(False))
    if not cased.any():
        return texts
    return texts.clone().scatter(np.flatnonzero(cased.to_numpy()), on_all_cores(texts.filter(cased), lambda t: t.str.to_lowercase()))


def on_all_cores(column: pl.Series, expression: Callable[[pl.Expr], pl.Expr]) -> pl.Series:
    """expression(column), by polars' streaming engine: it works on pieces of the column on every
    core, where the default engine gives one column's string function one core (2x here)."""
    return column.to_frame("x").lazy().select(expression(pl.col("x"))).collect(engine="streaming").to_series()


def as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def checked(frame: pl.DataFrame, p: CleanParams) -> pl.DataFrame:
    """The reason each (fixed) record is unusable, or null, and the facts later steps need: source
    label, duplicate key, conflict key (system prompt and question), answer key, prompt and answer
    lengths in characters, and the texts near-duplicates and tokens are measured on."""
    frame = with_folded(frame)
    E = pl.element()
    role, content = E.struct.field("role"), E.struct.field("content")
    folded_turns = pl.col("folded_turns")
    msgs, text, text_folded, tools = pl.col("messages"), pl.col("text"), pl.col("text_folded"), pl.col("tools_json")
    rejected = pl.col("rejected").struct.field("content")
    is_text = text.is_not_null()
    chat = ~is_text
    last = msgs.list.last()
    last_content = last.struct.field("content")
    users = msgs.list.eval(E.filter(role == "user").struct.field("content"))

    def any_content(test) -> pl.Expr:
        """test(texts) for any of the texts the checks look at: the chunk or every turn, and the rejected answer."""
        on_record = pl.when(is_text).then(test(text)).otherwise(msgs.list.eval(test(content)).list.any())
        return on_record.fill_null(False) | test(rejected).fill_null(False)

    def words(keywords: list[str]):  # re.IGNORECASE's matching, as lower case on both sides
        return lambda s: s.str.to_lowercase().str.contains_any([k.lower() for k in keywords])

    fixer = TextFixer(p)
    placeholders = placeholder_regex(sorted({placeholder(fixer.text(t)) for t in p.placeholder_answers}))
    chars = (pl.when(is_text).then(text.str.len_chars()).otherwise(msgs.list.eval(content.str.len_chars()).list.sum())
             + rejected.str.len_chars().fill_null(0))
    rules = []  # (reason, condition), in the order they are checked: a row gets the first that holds
    if p.replacement_char == "reject":
        rules.append(("replacement_char", any_content(lambda s: s.str.contains(BROKEN.pattern))))
    if p.pii.enabled and p.pii.action == "reject":
        rules.append(("pii", any_content(lambda s: s.str.contains_any(PII_TAGS))))
    rules += [
        ("empty_text", is_text & (text.str.strip_chars() == "")),
        ("no_user_assistant_pair", chat & (~msgs.list.eval(role).list.contains("user")
                                           | (last.struct.field("role") != "assistant").fill_null(True))),
        ("empty_turn", chat & (msgs.list.eval(role.is_in(["user", "assistant"]) & (content == "")).list.any()
                               | (rejected == "").fill_null(False))),
        ]
    if placeholders is not None:
        rules.append(("placeholder_answer", chat & last_content.str.contains(placeholders)))
        if p.placeholder_questions:
            rules.append(("placeholder_question", chat & msgs.list.eval(
                (role == "user") & content.str.contains(placeholders)).list.any()))
    rules += [("identical_pair", chat & (rejected == last_content).fill_null(False)),
              ("too_short", chars < p.min_chars)]
    if p.max_chars is not None:
        rules.append(("too_long", chars > p.max_chars))
    rules.append(("answer_too_short", chat & (last_content.str.len_chars() < p.min_answer_chars)))
    if p.exclude_keywords:
        rules.append(("excluded_keyword", any_content(words(p.exclude_keywords))))
    if p.include_keywords:
        rules.append(("off_domain", ~any_content(words(p.include_keywords))))
    reason = pl.lit(None, dtype=pl.String)
    for name, condition in reversed(rules):
        reason = pl.when(condition.fill_null(False)).then(pl.lit(name)).otherwise(reason)

    file, sheet = pl.col("source").struct.field("file"), pl.col("source").struct.field("sheet")
    prompt = pl.when(is_text).then("\x00text\x00" + text_folded).otherwise(  # records.prompt_key
        folded_turns.list.eval(E.filter(role == "user").struct.field("folded")).list.join("\n"))
    answer = pl.when(is_text).then(text).otherwise(last_content)  # what passes ends with the answer
    answer_folded = pl.when(is_text).then(text_folded).otherwise(folded_turns.list.last().struct.field("folded"))
    system = msgs.list.eval(E.filter(role == "system").struct.field("content")).list.first().fill_null("")
    columns = [
        "row", "id", reason.alias("reason"),
        pl.when(sheet.is_not_null()).then(file + "#" + sheet).otherwise(file).alias("label"),
        # exact duplicates: the same roles and lower-cased texts, tools and rejected answer
        pl.struct(folded_turns, text_folded, tools, rejected).hash().alias("duplicate_key"),
        # the same system prompt and question with other answers (chats without a rejected answer)
        pl.when(chat & rejected.is_null()).then((system + "\x00" + prompt).hash()).alias("conflict_key"),
        answer_folded.hash().alias("answer_key"), answer.alias("answer"),
        users.list.eval(E.str.len_chars()).list.sum().fill_null(0).alias("prompt_chars"),
        answer.str.len_chars().fill_null(0).alias("answer_chars")]
    if p.near_duplicates.enabled:  # what near-duplicates compare (the chunk; the question and answer)
        columns.append(pl.when(is_text).then(text).otherwise(prompt + "\n" + answer_folded)
                       .alias("near_duplicate_text"))
    if p.min_tokens > 0 or p.max_tokens is not None:
        columns.append(pl.when(is_text).then(text).otherwise(msgs.list.eval(content).list.join("\n"))
                       .alias("token_text"))
    return frame.select(columns)


# ----------------------------------------------------------------------------------------------
# 3-4. tokens; near-duplicates
# ----------------------------------------------------------------------------------------------
def token_counts(texts: list[str], tokenizer_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    from stages.common import resolve_base

    if not (Path(tokenizer_dir) / "manifest.json").exists():
        raise StageError(f"{tokenizer_dir}: no base model manifest; run the base stage first, or set "
                         "clean.min_tokens: 0 and clean.max_tokens: null")
    path, load = resolve_base(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, **load)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]



def large_strings(texts: list[str] | pa.Array) -> pa.LargeStringArray:
    """The texts as Arrow large strings (a copy of them unless they are already)."""
    if isinstance(texts, list):
        return pa.array(texts, pa.large_string())
    return texts if texts.type == pa.large_string() else texts.cast(pa.large_string())


def utf8_buffers(texts: list[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The texts' UTF-8 bytes one after the other, and offsets (text i is data[offsets[i]:offsets[i + 1]]):
    Arrow's buffers, for the compiled loops below."""
    array = large_strings(texts)
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)), offsets


def minhash_signatures(texts: list[str] | pa.Array, ngram: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures of the character n-gram sets of `texts`. Exactly datasketch's
    MinHash(num_perm, seed, scheme="affine32") fed the n-grams with `ngram_hash32` as hash function
    (tests/test_data_stages.py checks), computed by a compiled loop (numba) over the texts' UTF-8
    bytes, one text per thread at a time: ~1 us a text instead of ~15 with numpy. One row per text
    (a view of the array signatures_into fills one column per text: LSH reads it a permutation at a time)."""
    data, offsets = utf8_buffers(texts)
    out = np.empty((num_perm, len(offsets) - 1), dtype=np.uint32)
    a, b = minhash_permutations(num_perm, seed)
    if len(offsets) > 1:
        signatures_into(data, offsets, ngram, a, b, out)
    return out.T


@numba.njit(parallel=True, cache=True, nogil=True)
def signatures_into(data, offsets, ngram, a, b, out):  # pragma: no cover (compiled)
    """out[:, row] = min over the row's n-gram hashes h of a * fmix32(h >> 32) + b (mod 2^32)."""
    for row in numba.prange(offsets.shape[0] - 1):
        sig = np.full(a.shape[0], np.uint32(0xFFFFFFFF), dtype=np.uint32)
        for h in ngram_hashes(data, offsets[row], offsets[row + 1], ngram):
            hv = np.uint32(h >> np.uint64(32))  # datasketch's _fmix(hv, 32), then each affine permutation
            hv = np.uint32(np.uint32(hv ^ (hv >> np.uint32(16))) * np.uint32(0x85EBCA6B))
            hv = np.uint32(np.uint32(hv ^ (hv >> np.uint32(13))) * np.uint32(0xC2B2AE35))
            hv = np.uint32(hv ^ (hv >> np.uint32(16)))
            for j in range(a.shape[0]):
                v = np.uint32(a[j] * hv + b[j])
                if v < sig[j]:
                    sig[j] = v
        out[:, row] = sig


@numba.njit(cache=True, nogil=True)
def ngram_hashes(data, start, end, ngram):  # pragma: no cover (compiled)
    """ngram_hash64 of each character n-gram of the UTF-8 text data[start:end], in order (of the
    whole text if it is shorter; none if it is empty): a polynomial hash of the code points, rolled
    along the text (the code point leaving the window is taken out)."""
    P = np.uint64(0x100000001B3)
    P_ngram = np.uint64(1)
    for _ in range(ngram):
        P_ngram = P_ngram * P
    out = np.empty(end - start, dtype=np.uint64)  # at most one n-gram a byte
    window = np.zeros(ngram, dtype=np.uint64)
    h, count, n, i = np.uint64(0), 0, 0, start
    while i < end:  # decode one code point
        lead = np.uint64(data[i])
        if lead < 0x80:
            code, size = lead, 1
        elif lead < 0xE0:
            code, size = lead & np.uint64(0x1F), 2
        elif lead < 0xF0:
            code, size = lead & np.uint64(0x0F), 3
        else:
            code, size = lead & np.uint64(0x07), 4
        for k in range(1, size):
            code = (code << np.uint64(6)) | (np.uint64(data[i + k]) & np.uint64(0x3F))
        i += size
        h = h * P + code - window[count % ngram] * P_ngram
        window[count % ngram] = code
        count += 1
        if count >= ngram:
            out[n] = h
            n += 1
    if 0 < count < ngram:
        out[n] = h
        n += 1
    return out[:n]


@numba.njit(parallel=True, cache=True, nogil=True)
def jaccard_into(data, offsets, ngram, left, right, bounds, out):  # pragma: no cover (compiled)
    """out[k] = the Jaccard similarity of the n-gram hash sets of texts left[k] and right[k]; the
    pairs come sorted by left, pairs bounds[g]..bounds[g + 1] sharing one (its set made once).
    Sets are open-addressing hash tables (sorting each text's n-grams took 10x longer)."""
    for g in numba.prange(bounds.shape[0] - 1):
        first = ngram_hashes(data, offsets[left[bounds[g]]], offsets[left[bounds[g]] + 1], ngram)
        first_set, first_used, first_size = hash_set(first)
        for k in range(bounds[g], bounds[g + 1]):
            other_set, other_used, other_size = hash_set(ngram_hashes(data, offsets[right[k]], offsets[right[k] + 1], ngram))
            common = 0
            for slot in range(other_set.shape[0]):
                if other_used[slot] and slot_of(first_set, first_used, other_set[slot]) >= 0:
                    common += 1
            union = first_size + other_size - common
            out[k] = common / union if union else 0.0


@numba.njit(cache=True, nogil=True)
def hash_set(hashes):  # pragma: no cover (compiled)
    """The distinct hashes as an open-addressing table (slots, which slots are used, how many)."""
    capacity = 16
    while capacity < 2 * hashes.shape[0]:
        capacity *= 2
    slots, used, size = np.zeros(capacity, dtype=np.uint64), np.zeros(capacity, dtype=np.bool_), 0
    for h in hashes:
        slot = slot_of(slots, used, h)
        if slot < 0:
            slot = -slot - 1
            slots[slot], used[slot] = h, True
            size += 1
    return slots, used, size


@numba.njit(cache=True, nogil=True, inline="always")
def slot_of(slots, used, h):  # pragma: no cover (compiled)
    """The slot holding h, or -(the free slot where it would go) - 1 (linear probing)."""
    mask = slots.shape[0] - 1
    slot = np.int64((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask  # Fibonacci hashing mixes the bits
    while used[slot]:
        if slots[slot] == h:
            return slot
        slot = (slot + 1) & mask
    return -slot - 1


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = (x.astype(np.uint32) for x in MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations)
    return a, b


def ngram_hash64(text: str) -> int:
    h = 0
    for ch in text:
        h = (h * 0x100000001B3 + ord(ch)) & 0xFFFFFFFFFFFFFFFF
    return h


def ngram_hash32(gram: bytes | str) -> int:
    """The n-gram hash minhash_signatures uses, as a datasketch hashfunc (for the test)."""
    text = gram.decode("utf-8") if isinstance(gram, bytes) else gram
    return ngram_hash64(text) >> 32


def near_duplicate_groups(texts: list[str] | pa.Array, nd: NearDuplicates) -> np.ndarray:
    """For each text, the index of the first text of its near-duplicate group (itself if none).
    Locality-sensitive hashing over MinHash signatures, with the bands datasketch's MinHashLSH
    picks for the threshold (b bands of r rows), bucketed for all texts at once with numpy rather
    than one dict insert and query per text (~20x faster on 1M rows). A candidate pair whose
    MinHash estimate is not clearly above the threshold joins a group only if its exact Jaccard
    similarity reaches it: estimates are noisy (templated answers about two drugs would otherwise
    merge). Groups are the connected components of the pairs that join."""
    from datasketch import MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    texts = large_strings(texts)  # once, for both compiled loops
    permutations = minhash_signatures(texts, nd.ngram, nd.num_perm, nd.seed).T  # contiguous rows
    n = permutations.shape[1]
    lsh = MinHashLSH(threshold=nd.threshold, num_perm=nd.num_perm)
    candidates = []
    for band in range(lsh.b):
        h = np.zeros(n, dtype=np.uint64)
        for column in range(band * lsh.r, (band + 1) * lsh.r):
            h = h * np.uint64(0x100000001B3) + permutations[column]
        order = np.argsort(h, kind="stable")
        ordered = h[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        first = order[starts][np.cumsum(np.concatenate([[True], ordered[1:] != ordered[:-1]])) - 1]
        same = first != order
        candidates.append(first[same].astype(np.int64) * n + order[same])  # (first of bucket, member)
    pairs = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, dtype=np.int64)
    left, right = pairs // n, pairs % n  # sorted by left
    estimate = np.zeros(len(pairs))
    for lo in range(0, len(pairs), 200_000):
        sl = slice(lo, lo + 200_000)
        estimate[sl] = (permutations[:, left[sl]] == permutations[:, right[sl]]).mean(axis=0)
    # the estimate's standard deviation is at most 0.5 / sqrt(num_perm) (0.06 for 64): far above the
    # threshold a pair is in, far below it is out, and only the band between gets the exact check
    margin = 0.8 / np.sqrt(nd.num_perm)  # 1.6 standard deviations
    unsure = np.flatnonzero((estimate >= nd.threshold - 2 * margin) & (estimate < nd.threshold + margin))
    exact = np.zeros(len(unsure))
    if len(unsure):  # exact similarity on 64-bit n-gram hashes, each pair's first text hashed once
        bounds = np.flatnonzero(np.concatenate([[True], left[unsure][1:] != left[unsure][:-1], [True]]))
        data, offsets = utf8_buffers(texts)
        jaccard_into(data, offsets, nd.ngram, left[unsure], right[unsure], bounds, exact)
    joined = estimate >= nd.threshold + margin
    joined[unsure] = exact >= nd.threshold
    graph = coo_matrix((np.ones(joined.sum(), dtype=np.int8), (left[joined], right[joined])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first_of_component = np.unique(component, return_index=True)
    return first_of_component[component]


# ----------------------------------------------------------------------------------------------
# 6. the LLM judge
# ----------------------------------------------------------------------------------------------
def judge_scores(records: list[dict], j: Judge, cache_path: Path, stats: Counter) -> list[float | None]:
    """Scores from an OpenAI-compatible chat endpoint; each answer is cached under the hash of
    (model, prompt, conversation), so a rerun only asks about rows it has not seen."""
    import urllib.error
    import urllib.request

    cache = {}
    if cache_path.exists():
        with open(cache_path, "rb") as f:
            for line in f:
                if line.strip():
                    entry = orjson.loads(line)
                    cache[entry["key"]] = entry
    if not j.model:
        raise StageError("params.yaml: clean.judge.model is empty (the judge is enabled)")
    key_value = os.environ.get(j.api_key_env, "")

    def conversation(r: dict) -> str:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in r["messages"] if m["role"] != "system")

    keys = [hashlib.sha256(orjson.dumps([j.model, j.prompt, conversation(r)])).hexdigest() for r in records]
    url = j.url.rstrip("/") + "/chat/completions"

    def ask(key_and_record: tuple[str, dict]) -> dict:
        key, record = key_and_record
        body = orjson.dumps({"model": j.model, "temperature": 0, "max_tokens": 16, "messages": [
            {"role": "user", "content": j.prompt.replace("{conversation}", conversation(record))}]})
        headers = {"Content-Type": "application/json"}
        if key_value:
            headers["Authorization"] = f"Bearer {key_value}"
        for attempt in range(j.retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=j.timeout_s) as response:
                    reply = orjson.loads(response.read())["choices"][0]["message"]["content"] or ""
                break
            except urllib.error.HTTPError as e:
                if attempt == j.retries or e.code not in (429, 500, 502, 503, 504):
                    raise StageError(f"clean.judge: {url} answered HTTP {e.code} ({e.read()[:200]!r})") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                if attempt == j.retries:
                    raise StageError(f"clean.judge: {url} unreachable ({getattr(e, 'reason', e)})") from None
            except (KeyError, IndexError, TypeError, orjson.JSONDecodeError):
                raise StageError(f"clean.judge: {url} did not answer like an OpenAI chat completion") from None
        number = re.search(r"\d+(?:\.\d+)?", reply)
        return {"key": key, "score": float(number[0]) if number else None, "reply": reply[:200]}

    todo = list({k: r for k, r in zip(keys, records) if k not in cache or cache[k]["score"] is None}.items())
    stats["cached"] = sum(k in cache and cache[k]["score"] is not None for k in keys)
    stats["requests"] = len(todo)
    try:
        with ThreadPoolExecutor(max_workers=max(1, j.max_workers)) as pool:
            for entry in pool.map(ask, todo):
                cache[entry["key"]] = entry
    finally:  # what was paid for is kept, even if a later request failed
        with atomic_path(cache_path) as tmp, open(tmp, "wb") as f:
            f.writelines(orjson.dumps(cache[k]) + b"\n" for k in sorted(cache))
    scores = [cache[k]["score"] for k in keys]
    stats["unparseable"] = sum(s is None for s in scores)
    return scores


# ----------------------------------------------------------------------------------------------
# the whole stage, as a function of the records file's bytes (tunepipe inspect runs it too)
# ----------------------------------------------------------------------------------------------
LENGTH_BINS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def clean_data(data: bytes, path: str, p: CleanParams, judge_cache: Path | None = None) -> dict:
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
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if p.drop_duplicates and n:
        firsts = (facts.filter(pl.col("reason").is_null())
                  .select("row", pl.col("row").min().over("duplicate_key").alias("first"))
                  .filter(pl.col("row") != pl.col("first")))
        later = firsts["row"].to_numpy().astype(np.int64)
        duplicate_of[later] = firsts["first"].to_numpy()
        reasons[later] = "duplicate"
    rejected: list[tuple[int, dict | None, str]] = [
        (i, {"duplicate_of": source_of(int(duplicate_of[i]))} if duplicate_of[i] >= 0 else None, reasons[i])
        for i in np.flatnonzero(reasons != None).tolist()]  # noqa: E711 (elementwise)
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

    conflicts, flags = [], [None] * len(kept)  # 5: conflicting answers
    kept_facts = facts.select("conflict_key", "answer_key").gather(kept).with_row_index("position")
    groups = (kept_facts.filter(pl.col("conflict_key").is_not_null())
              .group_by("conflict_key", maintain_order=True)
              .agg(pl.col("position"), pl.col("answer_key").n_unique().alias("answers"))
              .filter(pl.col("answers") > 1))
    questions = groups["position"].to_list()  # each question's rows, as positions in kept
    rows = kept[np.concatenate(questions)].tolist() if questions else []
    ids, answers = (facts[name].gather(rows).to_list() for name in ("id", "answer"))
    at = 0
    for positions in questions:
        group = range(at, at + len(positions))
        conflicts.append({"question": prompt_key(record_of(rows[at]))[:500], "rows": [
            {**source_of(rows[n]), "id": ids[n], "answer": answers[n][:300]} for n in group]})
        at += len(positions)
        for order, k in enumerate(positions):
            if p.conflicting_answers == "drop" or (p.conflicting_answers == "keep_first" and order > 0):
                flags[k] = "conflicting_answer"
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

    # the data card
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
    assert metrics["rows_in"] == n, "clean lost rows"
    lap("judge_and_data_card")
    progress.close()
    return {"kept": [(i, added.get(i)) for i in kept.tolist()], "rejected": rejected, "line": line, "lines": lines,
            "conflicts": conflicts, "metrics": metrics, "histogram": histogram, "seconds": seconds}


def clean_records(records: Iterable[dict], p: CleanParams, judge_cache: Path | None = None) -> dict:
    """Fix, check and deduplicate records in this process (`tunepipe inspect` and tests), by the
    stage's own code on their JSON lines. Returns kept and rejected records (each rejected one with
    its reason), conflicts (the same question, different answers) and metrics."""
    data = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)
    result = clean_data(data, "records", p, judge_cache)
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
        result = clean_data(read_file(args.records), args.records, p, Path(args.judge_cache))
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
