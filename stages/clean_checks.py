"""clean, step 2: per-row checks and the facts later steps need, as column expressions (polars)
over all rows at once: replacement characters, turn structure, empty turns, unfilled template
placeholders (clean_placeholders.py), placeholder questions and answers, lengths in characters, domain keywords, identical pairs; then the keys of duplicates,
near-duplicates and conflicts. And the token count rule (step 3, with the base tokenizer)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from stages.clean_placeholders import unfilled_placeholders
from stages.clean_text import BROKEN, PII_TAGS, TextFixer, placeholder_finder
from stages.common import StageError

if TYPE_CHECKING:
    from stages.clean import CleanParams


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
    finder = placeholder_finder(p)
    frame = with_folded(frame).with_columns(
        unfilled_placeholders(frame, finder) if finder else pl.lit(None, dtype=pl.String).alias("placeholder"))
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
    if finder is not None:
        rules.append(("unfilled_placeholder", pl.col("placeholder").is_not_null()))
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
        "row", "id", reason.alias("reason"), "placeholder",
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



def token_counts(texts: list[str], tokenizer_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    from stages.common import resolve_base

    if not (Path(tokenizer_dir) / "manifest.json").exists():
        raise StageError(f"{tokenizer_dir}: no base model manifest; run the base stage first, or set "
                         "clean.min_tokens: 0 and clean.max_tokens: null")
    path, load = resolve_base(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, **load)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
