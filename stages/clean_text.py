"""clean, step 1: text fixes. Each returns the new text and counts what it changed; nothing is dropped
here. Mojibake (ftfy), Unicode NFKC (Chinese full-width punctuation, ①②③, superscripts and fractions
kept), HTML tags and entities, template placeholders given a value ({{name}}: clean_placeholders.py),
whitespace, punctuation a turn starts with ("，..."), and PII redaction (mainland mobile and
landline numbers, ID-card numbers, bank cards, emails). A cheap
search comes first, so clean text costs little; may_need_fixing is the regex that picks the texts
the Python fixes run on at all."""
from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections import Counter
from typing import TYPE_CHECKING, Literal

import orjson

from stages.clean_placeholders import PlaceholderFinder
from stages.common import Params
from stages.records import record_id

if TYPE_CHECKING:
    from stages.clean import CleanParams


class Pii(Params):
    enabled: bool = True
    kinds: list[Literal["mobile", "landline", "id_card", "bank_card", "email"]] = [
        "mobile", "landline", "id_card", "bank_card", "email"]
    action: Literal["redact", "reject"] = "redact"



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
PII_TAGS = ["[PHONE]", "[ID_CARD]", "[EMAIL]", "[BANK_CARD]"]  # what redaction writes


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


def placeholder_finder(p: CleanParams) -> PlaceholderFinder | None:
    """Template placeholders ({{name}}, [NAME]) to fill in or reject; the redaction markers are text."""
    return PlaceholderFinder(p.placeholders, PII_TAGS) if p.placeholders.enabled else None


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
        self.placeholders = placeholder_finder(p) if p.placeholders.values else None  # to fill in

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
        if self.placeholders is not None and (fixed := self.placeholders.fill(text)) != text:
            self.fixes["placeholders_filled"] += 1
            text = fixed
            odd = self.odd is not None and self.odd.search(text) is not None  # the values are text too
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
    if p.placeholders.enabled and p.placeholders.values and (finder := placeholder_finder(p)).prefilter:
        parts.append(finder.prefilter)
    return "|".join(parts) or None
