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
Steps 1-2 and the MinHash signatures go record by record (first_pass): on a large file, one
worker process per core does a share of the lines; steps 3-6 (decide) need all rows and run once,
on what first_pass found. Records written unchanged are the bytes that were read.
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
from array import array
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import orjson

from stages.common import Params, StageError, atomic_path, load_params, run_stage, write_json
from stages.records import (Lines, answer_text, in_forked_shares, no_cycle_collection, parse_record, prompt_key,
                             read_file, record_id, shown, source_label, spans_of_share, with_keys, write_lines_to,
                             write_records)

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


class TextFixer:
    """The text fixes of step 1, configured once; counts what each one changed."""

    def __init__(self, p: CleanParams):
        self.p = p
        self.compat = compat_class(KEEP if p.keep_cjk_punctuation else "") if p.normalize_unicode else None
        self.fixes: Counter = Counter()
        self.redactions: Counter = Counter()
        kinds = [k for k in PII_PATTERNS if k in p.pii.kinds] if p.pii.enabled else []
        self.pii = re.compile("|".join(f"(?P<{k}>{PII_PATTERNS[k][0]})" for k in kinds)) if kinds else None
        # One scan for a character that mojibake, NFKC or odd whitespace would start with (almost
        # all text has none): one regex pass instead of three, and the rules' own checks only if needed
        odd = ("\u00c2-\u00f4" if p.fix_mojibake else "") + (WS_ODD_CHARS if p.collapse_whitespace else "")
        odd += compat_chars(KEEP if p.keep_cjk_punctuation else "") if p.normalize_unicode else ""
        self.odd = re.compile(f"[{odd}]") if odd else None

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
# 2. per-row checks
# ----------------------------------------------------------------------------------------------
def keyword_pattern(words: list[str]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, sorted(words, key=len, reverse=True))), re.I) if words else None


class Placeholders:
    """The placeholder texts; `text in placeholders` compares a text as placeholder() normalises it."""

    def __init__(self, texts: Iterable[str]):
        self.texts = {placeholder(t) for t in texts}
        self.longest = max(map(len, self.texts), default=-1)

    def __contains__(self, text: str) -> bool:
        core = text.strip().rstrip(".。!！ ")
        # casefold never shortens a string: a text longer than every placeholder is none of them,
        # and long answers are not case-folded for nothing
        return len(core) <= self.longest and core.casefold() in self.texts


def check(record: dict, p: CleanParams, placeholders: Placeholders, include, exclude) -> str | None:
    """Why a fixed record is unusable, or None if it is fine."""
    text = record.get("text")
    contents = [text] if text is not None else [m["content"] for m in record["messages"]]
    if record.get("rejected") is not None:
        contents.append(record["rejected"]["content"])
    if p.replacement_char == "reject" and BROKEN.search("\n".join(contents)):  # no pattern spans a line break
        return "replacement_char"
    if p.pii.enabled and p.pii.action == "reject" and any(tag in c for c in contents
                                                          for tag in ("[PHONE]", "[ID_CARD]", "[EMAIL]", "[BANK_CARD]")):
        return "pii"
    if text is not None:
        if not text.strip():
            return "empty_text"
    else:
        roles = [m["role"] for m in record["messages"]]
        if "user" not in roles or roles[-1] != "assistant":
            return "no_user_assistant_pair"
        if any(not m["content"] for m in record["messages"] if m["role"] in ("user", "assistant")):
            return "empty_turn"
        if record.get("rejected") is not None and not record["rejected"]["content"]:
            return "empty_turn"
        if record["messages"][-1]["content"] in placeholders:
            return "placeholder_answer"
        if p.placeholder_questions and any(m["content"] in placeholders
                                           for m in record["messages"] if m["role"] == "user"):
            return "placeholder_question"
        if record.get("rejected") is not None and record["rejected"]["content"] == record["messages"][-1]["content"]:
            return "identical_pair"
    chars = sum(map(len, contents))
    if chars < p.min_chars:
        return "too_short"
    if p.max_chars is not None and chars > p.max_chars:
        return "too_long"
    if text is None and len(record["messages"][-1]["content"]) < p.min_answer_chars:
        return "answer_too_short"
    if exclude is not None and any(exclude.search(c) for c in contents):
        return "excluded_keyword"
    if include is not None and not any(include.search(c) for c in contents):
        return "off_domain"
    return None


def duplicate_key(record: dict) -> bytes:
    """Exact duplicates: the same roles and case-folded texts (after the fixes)."""
    body = [[m["role"], m["content"].casefold()] for m in record["messages"]]
    body.append([record.get("text", "").casefold() if record.get("text") else None, record.get("tools"),
                 (record.get("rejected") or {}).get("content")])
    return hashlib.blake2b(orjson.dumps(body), digest_size=16).digest()


def placeholder(text: str) -> str:
    return text.strip().rstrip(".。!！ ").casefold()


# ----------------------------------------------------------------------------------------------
# 3-4. tokens; near-duplicates
# ----------------------------------------------------------------------------------------------
def token_counts(records: list[dict], tokenizer_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    from stages.common import resolve_base

    if not (Path(tokenizer_dir) / "manifest.json").exists():
        raise StageError(f"{tokenizer_dir}: no base model manifest; run the base stage first, or set "
                         "clean.min_tokens: 0 and clean.max_tokens: null")
    path, revision = resolve_base(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    texts = [r["text"] if r.get("text") is not None else "\n".join(m["content"] for m in r["messages"]) for r in records]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def near_duplicate_text(record: dict, prompt: str | None = None) -> str:
    """What near-duplicates compare; `prompt`: the record's prompt_key, where already at hand."""
    if record.get("text") is not None:
        return record["text"]
    return (prompt_key(record) if prompt is None else prompt) + "\n" + answer_text(record).casefold()


def minhash_signatures(texts: list[str], ngram: int, num_perm: int, seed: int, batch: int = 1000) -> np.ndarray:
    """MinHash signatures of the character n-gram sets of `texts`, computed for many texts at once
    with numpy. Exactly datasketch's MinHash(num_perm, seed, scheme="affine32") fed the n-grams with
    `ngram_hash32` as hash function (tests/test_data_stages.py checks), only ~100x faster: n-gram
    hashes are a rolling polynomial over the code points of all texts of a batch."""
    a, b = minhash_permutations(num_perm, seed)
    from datasketch.minhash import _fmix

    out = np.full((len(texts), num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        hashes, counts = batch_ngram_hashes(chunk, ngram)
        hv = _fmix((hashes >> np.uint64(32)).astype(np.uint32), 32)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nonempty = counts > 0
        sig = out[start:start + len(chunk)]
        if hv.size:
            permuted, first = np.empty_like(hv), offsets[nonempty]
            for j in range(num_perm):  # in place: no temporary arrays per permutation
                np.multiply(hv, a[j], out=permuted)
                permuted += b[j]
                sig[nonempty, j] = np.minimum.reduceat(permuted, first)
    return out


@functools.cache
def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = (x.astype(np.uint32) for x in MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations)
    return a, b


def batch_ngram_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit rolling hashes of the n-grams of `texts` (of the whole text if shorter), one text
    after the other, and how many each text has; computed over all texts at once."""
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    ends = np.cumsum(lens)
    starts = ends - lens
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    h = codes.copy()
    for k in range(1, min(ngram, len(h))):  # h[i] = sum codes[i + j] * P^(ngram-1-j), mod 2^64
        h[:len(h) - k] *= np.uint64(0x100000001B3)
        h[:len(h) - k] += codes[k:]
    # the hash of a text shorter than ngram is the hash of the whole text
    short = np.flatnonzero((lens < ngram) & (lens > 0))
    for i in short:
        h[starts[i]] = np.uint64(ngram_hash64(texts[i]))
    valid = np.ones(len(h), dtype=bool)
    for k in range(1, ngram):  # windows running past their text's end
        pos = ends - k
        valid[pos[pos >= starts]] = False
    valid[starts[short]] = True
    counts = np.where(lens >= ngram, lens - ngram + 1, (lens > 0).astype(np.int64))
    return h[valid], counts


def distinct_ngram_hashes(texts: list[str], ngram: int, batch: int = 1000) -> list[np.ndarray]:
    """Each text's distinct n-gram hashes, sorted (for exact Jaccard similarity). A batch of texts
    at a time is sorted row by row in one 2-D array padded with the largest hash, not one numpy
    call per text; texts go in order of length, so there is little padding."""
    out: list[np.ndarray] = [np.empty(0, dtype=np.uint64)] * len(texts)
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    lo = 0
    while lo < len(texts):
        longest = len(texts[by_length[min(lo + batch, len(texts)) - 1]])
        hi = min(lo + batch, len(texts), lo + max(1, 4_000_000 // max(1, longest)))  # at most ~32 MB a batch
        ids, lo = by_length[lo:hi], hi
        hashes, counts = batch_ngram_hashes([texts[i] for i in ids], ngram)
        starts = np.cumsum(counts) - counts
        rows = np.full((len(ids), max(1, counts.max())), np.uint64(0xFFFFFFFFFFFFFFFF))
        rows[np.repeat(np.arange(len(ids)), counts), np.arange(len(hashes)) - np.repeat(starts, counts)] = hashes
        rows.sort(axis=1)  # the padding sorts last: a row starts with its text's hashes, sorted
        first = np.ones(rows.shape, dtype=bool)
        first[:, 1:] = rows[:, 1:] != rows[:, :-1]
        for i, row, keep, n in zip(ids, rows, first, counts.tolist()):
            out[i] = row[:n][keep[:n]]
    return out


def ngram_hash64(text: str) -> int:
    h = 0
    for ch in text:
        h = (h * 0x100000001B3 + ord(ch)) & 0xFFFFFFFFFFFFFFFF
    return h


def ngram_hash32(gram: bytes | str) -> int:
    """The n-gram hash minhash_signatures uses, as a datasketch hashfunc (for the test)."""
    text = gram.decode("utf-8") if isinstance(gram, bytes) else gram
    return ngram_hash64(text) >> 32


def near_duplicate_groups(sigs: np.ndarray, text_of, nd: NearDuplicates) -> list[int]:
    """For each MinHash signature (a row of sigs), the index of the first row of its near-duplicate
    group (itself if none); text_of(i): the text of row i, for the exact checks.
    Locality-sensitive hashing over the MinHash signatures, with the bands datasketch's
    MinHashLSH picks for the threshold (b bands of r rows), bucketed for all texts at once with
    numpy rather than one dict insert and query per text (~20x faster on 1M rows). A candidate
    pair whose MinHash estimate is not clearly above the threshold joins a group only if its exact
    Jaccard similarity reaches it: estimates are noisy (templated answers about two drugs would
    otherwise merge)."""
    from datasketch import MinHashLSH

    n = len(sigs)
    lsh = MinHashLSH(threshold=nd.threshold, num_perm=nd.num_perm)
    candidates = []
    for band in range(lsh.b):
        h = np.zeros(n, dtype=np.uint64)
        for column in range(band * lsh.r, (band + 1) * lsh.r):
            h = h * np.uint64(0x100000001B3) + sigs[:, column]
        order = np.argsort(h, kind="stable")
        ordered = h[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        first = order[starts][np.cumsum(np.concatenate([[True], ordered[1:] != ordered[:-1]])) - 1]
        same = first != order
        candidates.append(first[same].astype(np.int64) * n + order[same])  # (first of bucket, member)
    pairs = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, dtype=np.int64)
    left, right = pairs // n, pairs % n
    estimate = np.zeros(len(pairs))
    for lo in range(0, len(pairs), 200_000):
        sl = slice(lo, lo + 200_000)
        estimate[sl] = (sigs[left[sl]] == sigs[right[sl]]).mean(axis=1)
    # the estimate's standard deviation is at most 0.5 / sqrt(num_perm) (0.06 for 64): far above the
    # threshold a pair is in, far below it is out, and only the band between gets the exact check
    margin = 0.8 / np.sqrt(nd.num_perm)  # 1.6 standard deviations
    sure = estimate >= nd.threshold + margin
    keep = estimate >= nd.threshold - 2 * margin
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # exact similarity (on 64-bit n-gram hashes) for the texts of the pairs in between only
    unsure = np.unique(np.concatenate([left[keep & ~sure], right[keep & ~sure]])).tolist()
    grams = dict(zip(unsure, distinct_ngram_hashes([text_of(k) for k in unsure], nd.ngram)))

    def jaccard(i: int, j: int) -> float:
        common = np.intersect1d(grams[i], grams[j], assume_unique=True).size
        return common / (grams[i].size + grams[j].size - common)

    for i, j, certain in zip(left[keep].tolist(), right[keep].tolist(), sure[keep].tolist()):
        ri, rj = root(i), root(j)
        if ri != rj and (certain or jaccard(i, j) >= nd.threshold):
            parent[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(n)]


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
# the whole stage, as a function (tunepipe inspect runs it too)
# ----------------------------------------------------------------------------------------------
LENGTH_BINS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def first_pass(records: Iterable[dict], p: CleanParams) -> tuple[list[tuple], np.ndarray | None, Counter, Counter]:
    """Steps 1-2, the duplicate key and the MinHash signature, record by record (in worker
    processes on a large file). Returns, for each record, (fixed record or None if unchanged,
    reason or None, source label, facts); the signatures (a row per record); the counts of fixes
    and redactions. facts, for records that pass the checks: (duplicate key, conflict key, answer
    hash, prompt chars, answer chars); later steps need no more of most records than that."""
    fixer = TextFixer(p)
    placeholders = Placeholders(TextFixer(p).text(t) for t in p.placeholder_answers)
    include, exclude = keyword_pattern(p.include_keywords), keyword_pattern(p.exclude_keywords)
    nd = p.near_duplicates
    out, texts, same = [], [], {}  # same: one object per label, pickled once
    digest = lambda text: hashlib.blake2b(text.encode(), digest_size=16).digest()  # noqa: E731
    for record in records:
        fixed = fixer.record(record)
        reason = check(fixed, p, placeholders, include, exclude)
        label = source_label(record)
        label = same.setdefault(label, label)
        if reason is not None:
            out.append((fixed if fixed is not record else None, reason, label, None))
            texts.append("")
            continue
        chat = fixed.get("text") is None
        prompt = prompt_key(fixed) if chat else None
        answer = answer_text(fixed)
        conflict_key = answer_key = None
        if chat and fixed.get("rejected") is None:  # the same system prompt and question...
            system = next((m["content"] for m in fixed["messages"] if m["role"] == "system"), "")
            conflict_key, answer_key = digest(system + "\x00" + prompt), digest(answer.casefold())  # ...other answers
        out.append((fixed if fixed is not record else None, None, label, (
            duplicate_key(fixed) if p.drop_duplicates else None, conflict_key, answer_key,
            sum(len(m["content"]) for m in fixed["messages"] if m["role"] == "user"), len(answer))))
        texts.append(near_duplicate_text(fixed, prompt) if nd.enabled else "")
    sigs = minhash_signatures(texts, nd.ngram, nd.num_perm, nd.seed) if nd.enabled else None
    return out, sigs, fixer.fixes, fixer.redactions


def decide(passed: list[tuple], sigs: np.ndarray | None, p: CleanParams, record_of, judge_cache: Path | None,
           fixes: Counter, redactions: Counter, seconds: dict) -> dict:
    """Steps 3-6 over first_pass's results for all records in order. record_of(i): record i as
    fixed, parsed again only where a step needs more than the facts (conflict reports, tokens,
    the judge, the sources and ids of duplicates). Returns kept [(i, keys added)], rejected
    [(i, keys added, reason)], conflicts and metrics."""
    clock = time.perf_counter()
    record_of = functools.lru_cache(maxsize=None)(record_of)

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    rejected: list[tuple[int, dict | None, str]] = []
    kept: list[int] = []
    added: dict[int, dict] = {}  # keys added to kept record i ("group", "judge_score")
    first_of: dict[bytes, int] = {}
    for i, (_, reason, _, facts) in enumerate(passed):  # 3: exact duplicates, in file order
        if reason is None and facts[0] is not None:
            first = first_of.setdefault(facts[0], i)
            if first != i:
                reason = "duplicate"
                rejected.append((i, {"duplicate_of": record_of(first)["source"]}, reason))
                continue
        if reason is not None:
            rejected.append((i, None, reason))
        else:
            kept.append(i)
    lap("duplicates")

    def drop(flags: list[str | None], extra: list[dict | None] | None = None) -> None:
        """Move the flagged rows from kept to rejected (extra[k]: keys added to rejected row k)."""
        nonlocal kept
        if not any(flags):
            return
        still = []
        for k, (i, reason) in enumerate(zip(kept, flags)):
            if reason:
                rejected.append((i, {**added.get(i, {}), **(extra[k] or {})} if extra else added.get(i), reason))
            else:
                still.append(i)
        kept = still

    if kept and (p.min_tokens > 0 or p.max_tokens is not None):  # 3: tokens
        counts = token_counts([record_of(i) for i in kept], p.tokenizer)
        drop(["too_few_tokens" if n < p.min_tokens else "too_many_tokens" if p.max_tokens is not None
              and n > p.max_tokens else None for n in counts])
        lap("tokens")

    nd = p.near_duplicates
    near_groups = 0
    if nd.enabled and len(kept) > 1:  # 4: near-duplicates
        roots = near_duplicate_groups(sigs[kept], lambda k: near_duplicate_text(record_of(kept[k])), nd)
        members = Counter(roots)
        near_groups = sum(1 for n in members.values() if n > 1)
        if nd.action == "drop":
            drop(["near_duplicate" if r != k else None for k, r in enumerate(roots)],
                 [{"duplicate_of": record_of(kept[r])["source"]} if r != k else None for k, r in enumerate(roots)])
        else:
            for k, r in enumerate(roots):
                if members[r] > 1:
                    added[kept[k]] = {"group": record_of(kept[r])["id"]}
    lap("near_duplicates")

    by_prompt: dict[bytes, list[int]] = defaultdict(list)  # 5: conflicting answers
    for k, i in enumerate(kept):
        if passed[i][3][1] is not None:
            by_prompt[passed[i][3][1]].append(k)
    conflicts, flags = [], [None] * len(kept)
    for ks in by_prompt.values():
        if len(ks) > 1 and len({passed[kept[k]][3][2] for k in ks}) > 1:
            records = [record_of(kept[k]) for k in ks]
            conflicts.append({"question": prompt_key(records[0])[:500], "rows": [
                {**r["source"], "id": r["id"], "answer": answer_text(r)[:300]} for r in records]})
            for n, k in enumerate(ks):
                if p.conflicting_answers == "drop" or (p.conflicting_answers == "keep_first" and n > 0):
                    flags[k] = "conflicting_answer"
    drop(flags)
    lap("conflicts")

    judge_stats: Counter = Counter()
    if p.judge.enabled and kept:  # 6: the LLM judge
        if judge_cache is None:
            raise StageError("clean.judge is enabled but no cache file was given (--judge-cache)")
        scores = judge_scores([record_of(i) for i in kept], p.judge, judge_cache, judge_stats)
        for i, score in zip(kept, scores):
            added[i] = {**added.get(i, {}), "judge_score": score}
        drop(["judge_low_score" if s is not None and s < p.judge.min_score else None for s in scores])
    if judge_cache is not None and not judge_cache.exists():  # a DVC out: there even when the judge is off
        with atomic_path(judge_cache) as tmp:
            tmp.write_bytes(b"")

    # the data card
    rows_in = Counter(row[2] for row in passed)
    kept_by = Counter(passed[i][2] for i in kept)
    rejected_by = defaultdict(Counter)
    for i, _, reason in rejected:
        rejected_by[passed[i][2]][reason] += 1
    by_source = {label: {"rows_in": n, "rows_kept": kept_by[label], "rows_rejected": sum(rejected_by[label].values()),
                         "rejected_by_reason": dict(sorted(rejected_by[label].items()))}
                 for label, n in sorted(rows_in.items())}
    by_reason = Counter(reason for _, _, reason in rejected)
    prompt_lengths = [passed[i][3][3] for i in kept]
    answer_lengths = [passed[i][3][4] for i in kept]
    metrics = {
        "rows_in": len(kept) + len(rejected), "rows_kept": len(kept), "rows_rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "by_source": by_source,
        "fixes": dict(sorted(fixes.items())),
        "pii_redacted": dict(sorted(redactions.items())),
        "conflicting_questions": len(conflicts),
        "conflicting_rows": sum(len(c["rows"]) for c in conflicts),
        "near_duplicate_groups": near_groups,
        "lengths": {name: summary(values) for name, values in (("prompt_chars", prompt_lengths),
                                                              ("answer_chars", answer_lengths))},
    }
    if p.judge.enabled:
        metrics["judge"] = dict(judge_stats)
    histogram = [{"chars": edge, "prompt": 0, "answer": 0} for edge in LENGTH_BINS]
    for name, values in (("prompt", prompt_lengths), ("answer", answer_lengths)):
        bins = np.searchsorted(LENGTH_BINS, np.asarray(values, dtype=np.int64), side="right") - 1  # as bisect_right
        for row, n in zip(histogram, np.bincount(bins, minlength=len(LENGTH_BINS)).tolist()):
            row[name] = n
    assert metrics["rows_in"] == len(passed), "clean lost rows"
    lap("judge_and_data_card")
    return {"kept": [(i, added.get(i)) for i in kept], "rejected": rejected, "conflicts": conflicts,
            "metrics": metrics, "histogram": histogram, "seconds": seconds}


def clean_records(records: Iterable[dict], p: CleanParams, judge_cache: Path | None = None) -> dict:
    """Fix, check and deduplicate records (in this process; `tunepipe inspect` and tests). Returns
    kept and rejected records (each rejected one with its reason), conflicts (the same question,
    different answers) and metrics."""
    records = list(records)
    passed, sigs, fixes, redactions = first_pass(records, p)
    fixed = [f if f is not None else r for r, (f, _, _, _) in zip(records, passed)]
    result = decide(passed, sigs, p, fixed.__getitem__, judge_cache, fixes, redactions, {})
    result["kept"] = [{**fixed[i], **extra} if extra else fixed[i] for i, extra in result["kept"]]
    result["rejected"] = [{**fixed[i], **(extra or {}), "reason": reason} for i, extra, reason in result["rejected"]]
    return result


def summary(values: list[int]) -> dict:
    if not values:
        return {"p50": 0, "p90": 0, "max": 0}
    ordered = sorted(values)
    return {"p50": ordered[len(ordered) // 2], "p90": ordered[int(len(ordered) * 0.9)], "max": ordered[-1]}


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
        clock = time.perf_counter()
        data = read_file(args.records)

        def share(lo: int, hi: int) -> tuple[array, array, list[tuple], np.ndarray | None, Counter, Counter]:
            spans, view = list(spans_of_share(data, lo, hi)), memoryview(data)
            passed, sigs, fixes, redactions = first_pass((parse_record(args.records, view[start:end], n)
                                                          for start, end, n in shown(spans, lo, hi, "clean")), p)
            # positions of the lines, and a fixed record as its new JSON line
            return (array("q", [start for start, _, _ in spans]), array("q", [end for _, end, _ in spans]),
                    [(orjson.dumps(f) if f is not None else None, *rest) for f, *rest in passed], sigs, fixes, redactions)

        shares = in_forked_shares(len(data), share, min_share=8_000_000)  # steps 1-2 on every core
        read = Lines(data, (x for s in shares for x in s[0]), (x for s in shares for x in s[1]))
        passed = [row for s in shares for row in s[2]]
        sigs = np.concatenate([s[3] for s in shares]) if p.near_duplicates.enabled else None
        fixes, redactions = sum((s[4] for s in shares), Counter()), sum((s[5] for s in shares), Counter())
        shares = None

        def line(i: int) -> bytes | memoryview:
            return passed[i][0] or read[i]

        seconds = {"read_fix_check": round(time.perf_counter() - clock, 2)}
        result = decide(passed, sigs, p, lambda i: orjson.loads(line(i)), Path(args.judge_cache), fixes, redactions,
                        seconds)
        write_lines_to(args.out, (with_keys(line(i), extra) for i, extra in result["kept"]))
        write_lines_to(args.rejected, (with_keys(line(i), {**(extra or {}), "reason": reason})
                                       for i, extra, reason in result["rejected"]))
        write_records(args.conflicts, result["conflicts"])
    with atomic_path(args.lengths_plot) as tmp:
        tmp.write_text("chars,prompt,answer\n" + "".join(f"{h['chars']},{h['prompt']},{h['answer']}\n"
                                                         for h in result["histogram"]))
    write_json(args.metrics, result["metrics"])
    m = result["metrics"]
    print(f"clean: kept {m['rows_kept']}, rejected {m['rows_rejected']} {m['rejected_by_reason']}; "
          f"fixes {m['fixes']}; redacted {m['pii_redacted']}; {m['conflicting_questions']} questions with "
          f"conflicting answers -> {args.conflicts}")
    print(f"clean: seconds by phase {result['seconds']}")


if __name__ == "__main__":
    run_stage(main)
