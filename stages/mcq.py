"""Multiple-choice questions (the `mcq` ingest format) and the option-letter parser eval scores them with.

A multiple-choice row is a question, options A, B, C, D (or more) and the letter of the right one:
- table (xlsx/csv): a question column, one column per option (headed A, B, C... or 选项A, Option A)
  and an answer column; named in params with question:, options: [...], answer:, else detected;
- JSON / JSON lines: a question field, options as a list, an {"A": ...} object or keys A, B, C...,
  and an answer field (renamed with fields:);
- text blocks (.txt/.md, or a docx exam paper with format: mcq):
      1. question
      A. option   B. option        (one option a line, or several on one line)
      C. option
      D. option
      answer: B                    (also 答案：B, 【答案】B, Answer: (B))
A canonical mcq record asks the question with its options in the user turn and has the letter
as the assistant turn, so it trains and splits like any other row, and carries
"mcq": {"options": [option texts, in letter order], "answer": letter} for eval.

This module imports nothing beyond the standard library: eval's OpenCompass config names
option_letter as its prediction postprocessor, in another environment.
"""
from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase[:10]   # A..J: at most ten options
OPTION_KEYS = ("options", "choices", "选项")
QUESTION_KEYS = ("question", "题目", "题干", "问题", "stem")
ANSWER_KEYS = ("answer", "答案", "correct", "label", "正确答案")


class McqProblem(ValueError):
    """A row that is not a well-formed multiple-choice question: ingest names file, row and column."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column, self.message = column, message


# ---------------------------------------------------------------------------------------------
# The option-letter parser (answers in data, and model outputs in eval)
# ---------------------------------------------------------------------------------------------
EXPLICIT = re.compile(r"(?:正确答案|参考答案|答案|应选|选择|选|correct\s+(?:answer|option|choice)|"
                      r"(?:the\s+)?answer)\s*(?:is|should\s+be|would\s+be|是|为|应为|[:：])?\s*"
                      r"[\(（\[【]?\s*([A-Za-z])(?![A-Za-z])", re.IGNORECASE)
LEADING = re.compile(r"^\s*[\(（\[【]?\s*([A-Za-z])\s*(?:[\)）\]】.．、:：,，]|$)")
STANDALONE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
ARTICLE = re.compile(r"\s+(?!(?:and|or)\b)[a-z]")  # "A drug", "I think": words, not options


def option_letter(text: str, options: str = "ABCD") -> str:
    """The option letter a text gives as its answer, or "" when it names none or several.
    Reads "B", "b", "B.", "(B) text", "答案：B", "The answer is (C).", "I'd rule out A; the answer is
    C": an explicit "answer ... X" wins, then a letter the text starts with, then the only option
    letter standing alone (the article "A" before a lower-case word is not one)."""
    text = (text or "").strip()
    allowed = set(options.upper())
    for m in EXPLICIT.finditer(text):
        if m[1].upper() in allowed:
            return m[1].upper()
    m = LEADING.match(text)
    if m and m[1].upper() in allowed:
        return m[1].upper()
    found = {m[1] for m in STANDALONE.finditer(text) if m[1] in allowed
             and not (m[1] in "AI" and ARTICLE.match(text, m.end()))}
    return found.pop() if len(found) == 1 else ""


def prompt_text(question: str, options: list[str]) -> str:
    """The user turn of an mcq record: the question, then one "X. option" line per option."""
    return "\n".join([question.strip(), *(f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options))])


def record_parts(question: str, options: list[str], answer: str, answer_column: str = "answer") -> tuple[list, dict]:
    """(user and assistant messages, {"mcq": ...}) of one question; the answer may be a letter in any
    of option_letter's forms, or the text of the right option."""
    while options and not options[-1].strip():  # a sheet with an E column, empty on 4-option rows
        options = options[:-1]
    if len(options) < 2:
        raise McqProblem(answer_column, f"a multiple-choice question needs at least 2 options, got {len(options)}")
    if len(options) > len(LETTERS):
        raise McqProblem(answer_column, f"at most {len(LETTERS)} options, got {len(options)}")
    letters = LETTERS[:len(options)]
    given = str(answer).strip()
    stripped = [o.strip() for o in options]
    letter = (letters[stripped.index(given)] if given and given in stripped
              else option_letter(given, letters) if len(given) <= 40 else "")
    if not letter:
        raise McqProblem(answer_column, f"answer {given!r} is not one of the option letters {', '.join(letters)}")
    messages = [{"role": "user", "content": prompt_text(question, options)},
                {"role": "assistant", "content": letter}]
    return messages, {"mcq": {"options": stripped, "answer": letter}}


# ---------------------------------------------------------------------------------------------
# Tables and JSON: which columns / keys hold question, options and answer
# ---------------------------------------------------------------------------------------------
OPTION_COLUMN = re.compile(r"^(?:选项|option|choice)?\s*[_ ]?([A-J])$", re.IGNORECASE)


def option_columns(header: list[str]) -> list[str]:
    """Columns headed A, B, C... (or 选项A, Option_B...), consecutive from A; [] unless at least A and B."""
    by_letter: dict[str, str] = {}
    for h in header:
        m = OPTION_COLUMN.match(h.strip()) if h else None
        if m and (len(h.strip()) > 1 or h.strip().isupper()):  # a bare "a" column is not option A
            by_letter.setdefault(m[1].upper(), h)
    columns = []
    for letter in LETTERS:
        if letter not in by_letter:
            break
        columns.append(by_letter[letter])
    return columns if len(columns) >= 2 else []


def named(keys: list[str], names: tuple[str, ...]) -> str | None:
    lower = {k.casefold(): k for k in keys if isinstance(k, str)}
    return next((lower[n] for n in names if n in lower), None)


def detect_mapping(keys: list[str], question: str | None = None, answer: str | None = None,
                   options: list[str] | None = None) -> dict | None:
    """The mapping {question, options (a key or a list of columns), answer} of a table header or a
    JSON object's keys, with any of them given in params; None when it is not a multiple-choice row
    (so format auto can ask this of any table or object without misfiring)."""
    question = question or named(keys, QUESTION_KEYS)
    answer = answer or named(keys, ANSWER_KEYS)
    opts: str | list[str] | None = options or named(keys, OPTION_KEYS) or option_columns(keys) or None
    if question is None or answer is None or opts is None:
        return None
    return {"question": question, "options": opts, "answer": answer}


def options_of(value, column: str) -> list[str]:
    """A JSON options value: a list, an {"A": ...} object, or text with one "X. option" a line."""
    if isinstance(value, list):
        return ["" if v is None else str(v) for v in value]
    if isinstance(value, dict):
        letters = sorted(value, key=lambda k: str(k).upper())
        if [str(k).upper() for k in letters] != list(LETTERS[:len(letters)]):
            raise McqProblem(column, f"option keys {letters} are not A, B, C... in order")
        return [str(value[k]) for k in letters]
    if isinstance(value, str):
        found = split_options(value.splitlines())
        if found:
            return found
    raise McqProblem(column, "expected the options as a list, an {A: ..., B: ...} object or 'A. ...' lines")


# ---------------------------------------------------------------------------------------------
# Text blocks
# ---------------------------------------------------------------------------------------------
BLOCK_START = re.compile(r"^\s*(?:第\s*\d+\s*题\s*[.．、:：]?|\d+\s*[.．、:：)）]|[(（]\d+[)）]|Q\s*\d+\s*[.:：])\s*(.*)$")
OPTION_START = re.compile(r"^\s*[(（]?([A-J])\s*[)）.．、:：]\s*")
OPTION_INLINE = re.compile(r"(?:^|\s)[(（]?([A-J])\s*[)）.．、:：]\s*")
ANSWER_LINE = re.compile(r"^\s*(?:【\s*(?:参考|正确)?答案\s*】|(?:参考|正确)?答案\s*[:：]|(?:correct\s+)?answer\s*[:：])\s*(.*)$",
                         re.IGNORECASE)


def split_options(lines: list[str]) -> list[str]:
    """Option texts of lines like "A. x", or "A. x  B. y  C. z" on one line; [] when the letters are
    not A, B, C... in order. A mark out of order ("A. vitamin D. B. ...") is text of its option."""
    texts: list[str] = []
    for line in lines:
        if not OPTION_START.match(line):
            if not texts:
                return []
            texts[-1] += "\n" + line.strip()  # an option's text running on to the next line
            continue
        kept = []
        for m in OPTION_INLINE.finditer(line):
            if len(texts) + len(kept) < len(LETTERS) and m[1] == LETTERS[len(texts) + len(kept)]:
                kept.append(m)
        if not kept or kept[0].start() > len(line) - len(line.lstrip()) + 1:
            return []
        for i, m in enumerate(kept):
            texts.append(line[m.end():kept[i + 1].start() if i + 1 < len(kept) else len(line)].strip())
    return texts if len(texts) >= 2 else []


def read_blocks(lines: list[str]) -> list[tuple[int, dict]]:
    """(line number of the question, {question, options, answer[, explanation]}) of every block;
    lines after the answer line (解析 ...) are its explanation, kept in meta."""
    blocks: list[tuple[int, dict]] = []
    current: dict | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        start = BLOCK_START.match(line)
        if start and (current is None or current["answer"] is not None or current["option_lines"] == []):
            if current is not None and current["answer"] is None and current["option_lines"] == []:
                current["question"].append(line.strip())  # "1." inside a question stem
                continue
            current = {"question": [start[1]], "option_lines": [], "answer": None, "explanation": []}
            blocks.append((number, current))
        elif current is None:
            continue  # a title or heading before the first question
        elif current["answer"] is None and (m := ANSWER_LINE.match(line)):
            current["answer"] = m[1].strip()
        elif current["answer"] is not None:
            current["explanation"].append(line.strip())
        elif OPTION_START.match(line) or current["option_lines"]:
            current["option_lines"].append(line)
        else:
            current["question"].append(line.strip())
    return [(n, {"question": "\n".join(b["question"]).strip(), "options": split_options(b["option_lines"]),
                 "answer": b["answer"] or "", **({"explanation": "\n".join(b["explanation"])} if b["explanation"] else {})})
            for n, b in blocks]


def looks_like_blocks(lines: list[str]) -> bool:
    """Format auto on a text file: mcq only when it is plainly question blocks (at least two, each
    with two or more options and an answer, covering most of the file's lines), else a corpus."""
    blocks = read_blocks(lines)
    complete = [b for _, b in blocks if len(b["options"]) >= 2 and b["answer"]]
    filled = sum(1 for line in lines if line.strip())
    covered = sum(1 + len(b["options"]) + 1 for b in complete)
    return len(complete) >= 2 and len(complete) == len(blocks) and covered >= filled / 2
