"""clean: unfilled template placeholders, such as the {{name}} and {{author}} of identity data sets,
<NAME> or [NAME]. A placeholder with a value in params (clean.placeholders.values) is filled in
among the text fixes of step 1 and the row kept; one without is rejected in step 2
(unfilled_placeholder), the rejected row naming it. The patterns are regexes in params; what looks
like a placeholder but is text is left alone: code (Markdown code spans and fences, List<ID>,
a[MAX_LEN]), Markdown links [TEXT](url), HTML/XML elements (<BR>, <NAME>...</NAME>), Roman numerals,
the redaction markers ([PHONE]) and the matches listed in `ignore` (Mistral's [TOOL_CALLS])."""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import polars as pl
from pydantic import field_validator

from stages.common import Params

# Capitals in brackets are placeholders when they are snake case ([USER_NAME], <QR_CODE_DATA>) or a
# word templates use; other capitals in brackets are abbreviations ([STEMI], [PO2]) or section tags
WORDS = "NAME|AUTHOR|USERNAME|COMPANY|ORG|ORGANIZATION|BRAND|PRODUCT|DATE|ADDRESS|CITY|URL|WEBSITE|PLACEHOLDER"
DEFAULT_PATTERNS = [
    r"\{\{\s*(?P<name>\w+)\s*\}\}",  # {{name}}, {{ author }} ({{ a.b }} and {{ x | f }} are code)
    rf"<(?P<name>[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|{WORDS})>",    # <NAME>, <ORG_NAME>
    rf"\[(?P<name>[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|{WORDS})\]",  # [NAME], [COMPANY_NAME]
]
# Snake-case capitals that are text: Mistral's chat-template control tokens
DEFAULT_IGNORE = ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[SYSTEM_PROMPT]"]
HTML_ELEMENTS = set("""a abbr address area article aside audio b base bdi bdo big blockquote body br button canvas
    caption center cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset
    figcaption figure font footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend
    li link main map mark meta meter nav noscript object ol optgroup option output p param picture pre progress q rp
    rt ruby s samp script section select small source span strong style sub summary sup svg table tbody td template
    textarea tfoot th thead time title tr track tt u ul var video wbr""".split())
CODE = re.compile(r"```[\s\S]*?(?:```|$)|`[^`\n]+`")
ROMAN = re.compile(r"M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})")


class Placeholders(Params):
    enabled: bool = True
    patterns: list[str] = DEFAULT_PATTERNS   # regexes with a (?P<name>...) group
    values: dict[str, str] = {}              # name -> the text filled in (names compare case-insensitively)
    ignore: list[str] = DEFAULT_IGNORE       # whole matches that are text, not placeholders

    @field_validator("patterns")
    @classmethod
    def usable(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regex ({e})") from None
            if "name" not in compiled.groupindex:
                raise ValueError(f"{pattern!r} has no (?P<name>...) group naming the placeholder")
            try:  # rows are picked by polars first (Rust regex: no look-around, no back-references)
                pl.Series([""]).str.contains(pattern)
            except pl.exceptions.PolarsError:
                raise ValueError(f"{pattern!r} is not a regex polars can run (no look-around or "
                                 "back-references)") from None
        return patterns


class PlaceholderFinder:
    """The placeholders in a text (those that are text left out), filled or listed."""

    def __init__(self, p: Placeholders, markers: Iterable[str] = ()):
        self.patterns = [re.compile(pattern) for pattern in p.patterns]
        self.values = {name.casefold(): value for name, value in p.values.items()}
        self.ignore = set(p.ignore) | set(markers)  # markers: what other fixes write ([PHONE])
        # any of the patterns, for polars (a row no pattern matches has no placeholder)
        self.prefilter = "|".join(f"(?:{pattern.replace('(?P<name>', '(')})" for pattern in p.patterns) or None

    def placeholders(self, text: str) -> list[re.Match]:
        """The placeholders in text, in order (of overlapping matches, the first)."""
        code = [m.span() for m in CODE.finditer(text)] if "`" in text else []
        found = sorted((m for pattern in self.patterns for m in pattern.finditer(text)
                        if not self.is_text(m, text, code)), key=lambda m: (m.start(), -m.end()))
        out, end = [], -1
        for m in found:
            if m.start() >= end:
                out.append(m)
                end = m.end()
        return out

    def is_text(self, m: re.Match, text: str, code: list[tuple[int, int]]) -> bool:
        whole, name = m[0], m["name"]
        if whole in self.ignore or ROMAN.fullmatch(name) or any(a < m.end() and m.start() < b for a, b in code):
            return True
        before = text[m.start() - 1:m.start()]
        if whole[0] in "<[" and before and before.isascii() and (before.isalnum() or before in "_]"):
            return True  # code: a generic type List<ID>, an index a[MAX_LEN]
        if whole.startswith("[") and text[m.end():m.end() + 1] in ("(", "["):  # [text](url), [text][ref]
            return True
        if whole.startswith("<"):  # an HTML element, or one closed later (<NAME>...</NAME>)
            return name.lower() in HTML_ELEMENTS or f"</{name}>" in text[m.end():]
        return False

    def fill(self, text: str) -> str:
        """text with each placeholder that has a value replaced by it."""
        parts, at = [], 0
        for m in self.placeholders(text):
            value = self.values.get(m["name"].casefold())
            if value is not None:
                parts += [text[at:m.start()], value]
                at = m.end()
        return "".join(parts) + text[at:] if parts else text

    def unfilled(self, text: str) -> str | None:
        """The first placeholder in text without a value, or None."""
        return next((m[0] for m in self.placeholders(text) if m["name"].casefold() not in self.values), None)


def unfilled_placeholders(frame: pl.DataFrame, finder: PlaceholderFinder) -> pl.Series:
    """For each record (columns messages, text, rejected), its first unfilled placeholder or null.
    polars picks the rows any pattern matches; Python looks at those only."""
    found: list[str | None] = [None] * frame.height
    if finder.prefilter is None or not frame.height:
        return pl.Series("placeholder", found, dtype=pl.String)
    E = pl.element().struct.field("content")
    candidates = frame.select(pl.any_horizontal(
        pl.col("messages").list.eval(E.str.contains(finder.prefilter)).list.any(),
        pl.col("text").str.contains(finder.prefilter),
        pl.col("rejected").struct.field("content").str.contains(finder.prefilter)).fill_null(False)).to_series()
    rows = frame.filter(candidates).select("messages", "text", "rejected").iter_rows()
    for k, (messages, text, rejected) in zip(np.flatnonzero(candidates.to_numpy()).tolist(), rows):
        texts = [m["content"] for m in messages or []] + [text, rejected and rejected["content"]]
        found[k] = next((hit for t in texts if t and (hit := finder.unfilled(t))), None)
    return pl.Series("placeholder", found, dtype=pl.String)
