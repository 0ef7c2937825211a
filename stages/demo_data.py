"""demo_data: write the embedded demo data set under data/raw/ (no download, seeded).

A few hundred medication questions about invented drugs, in the shapes real teams receive:
  - an .xlsx sheet with the mess real sheets have (a NaN answer, duplicated rows, placeholder
    answers such as "No answers", stray whitespace and non-breaking spaces),
  - a .jsonl in ShareGPT format (another chat format, with a system prompt),
  - a plain-text corpus of drug fact sheets, which the base stage pre-trains the demo model on,
  - an exam of multiple-choice questions on the same facts, as text blocks ("1. ... A. ... answer: B"),
  - tool-calling conversations (ShareGPT with tools): the pharmacist looks a fact up with a tool.
  - preference pairs (demo_preferences.jsonl, for the dpo stage; demo_data.preference_pairs a drug): a
    quick question, the bare fact as the chosen answer and the full sentence SFT teaches as the rejected one.
The drugs are fictional so nothing here can be mistaken for medical advice.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import zipfile
from datetime import datetime
from pathlib import Path

from openpyxl import Workbook
from openpyxl.xml.constants import ARC_CORE
from openpyxl.xml.functions import tostring

from pydantic import Field

from stages.common import Params, atomic_path, load_params, run_stage


class DemoDataParams(Params):
    seed: int = 7
    drugs: int = 60
    placeholder_answers: int = 4
    duplicated_rows: int = 3
    exam_questions: int = 60      # multiple-choice questions (one a drug, the first drugs)
    tool_rows: int = 30           # tool-calling conversations (one a drug, the last drugs)
    preference_pairs: int = Field(2, ge=1, le=4)  # preference pairs per drug, each on another question type


SYLLABLES = ["zor", "va", "tin", "pel", "mi", "dex", "lo", "ran", "qui", "sol", "ta", "ber", "no", "fa", "cor", "xi"]
CLASSES = [("an antihistamine", "seasonal allergies"), ("a beta blocker", "high blood pressure"),
           ("a statin", "high cholesterol"), ("a proton pump inhibitor", "acid reflux"),
           ("an antibiotic", "bacterial infections"), ("an anticonvulsant", "epilepsy"),
           ("an antidepressant", "depression"), ("a bronchodilator", "asthma"),
           ("an anticoagulant", "blood clots"), ("a pain reliever", "mild to moderate pain")]
SIDE_EFFECTS = ["headache", "nausea", "dizziness", "dry mouth", "drowsiness", "stomach upset", "fatigue", "rash"]
STORAGE = ["at room temperature away from moisture", "in the refrigerator", "below 25 degrees in its original pack",
           "away from light and heat"]
FOOD = ["with food", "on an empty stomach", "with or without food", "with a full glass of water"]
FREQ = ["once daily", "twice daily", "three times daily", "every eight hours"]

QUESTION_TYPES = {
    "usage": ("What is {d} used for?", "{D} is {cls} used to treat {cond}."),
    "dose": ("What is the usual adult dose of {d}?", "The usual adult dose of {d} is {mg} mg taken {freq}."),
    "side effects": ("What are the common side effects of {d}?", "Common side effects of {d} include {se1} and {se2}."),
    "storage": ("How should I store {d}?", "Store {d} {storage}."),
    "food": ("Should I take {d} with food?", "{D} should be taken {food}."),
}
# The same facts asked in other words, delivered as ShareGPT conversations.
REPHRASED = {
    "usage": "Can you tell me what {d} treats?",
    "dose": "How much {d} should an adult take?",
    "side effects": "Does {d} have side effects?",
    "storage": "Where do I keep my {d}?",
    "food": "Do I need to eat before taking {d}?",
}
SYSTEM_PROMPT = "You are a careful pharmacist. Answer in one sentence."


def invent_drugs(rng: random.Random, n: int) -> list[dict]:
    names: set[str] = set()
    drugs = []
    while len(drugs) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if name in names:
            continue
        names.add(name)
        cls, cond = rng.choice(CLASSES)
        se1, se2 = rng.sample(SIDE_EFFECTS, 2)
        drugs.append(dict(d=name, D=name.capitalize(), cls=cls, cond=cond, se1=se1, se2=se2,
                          mg=rng.choice([5, 10, 20, 25, 50, 100, 200, 250, 500]), freq=rng.choice(FREQ),
                          storage=rng.choice(STORAGE), food=rng.choice(FOOD)))
    return drugs


def sheet_rows(rng: random.Random, drugs: list[dict], p: DemoDataParams) -> list[list]:
    rows = []
    for drug in drugs:
        for qtype, (question, answer) in QUESTION_TYPES.items():
            rows.append([question.format(**drug), drug["D"], qtype, answer.format(**drug)])
    rng.shuffle(rows)
    # The mess of real sheets, at known places so tests can count it.
    rows[3][3] = None                                       # a NaN answer
    for i in range(p.placeholder_answers):                  # placeholder answers
        rows[10 + i][3] = ["No answers", "Unanswerable"][i % 2]
    rows[20][0] = "  " + rows[20][0] + "\u00a0 "           # stray whitespace and a NBSP
    rows[21][3] = rows[21][3].replace(" ", "  ", 2) + "\n"
    for i in range(p.duplicated_rows):                      # fully duplicated rows
        rows.append(list(rows[30 + i]))
    return rows


def write_xlsx(path: Path, header: list[str], rows: list[list]) -> None:
    wb = Workbook()
    ws = wb.active
    ws.title = "DrugQA"
    ws.append(header)
    for row in rows:
        ws.append(row)
    buf = io.BytesIO()
    wb.save(buf)
    # A stage's output should depend on its params only, but openpyxl writes the wall clock twice:
    # save() sets the document's modified time (docProps/core.xml) to now, and every zip entry
    # gets today's date. Re-zip in the same entry order with a fixed date and core.xml re-rendered
    # with fixed created/modified times, so every run writes the same bytes.
    fixed = datetime(2026, 1, 1)
    wb.properties.created = wb.properties.modified = fixed
    with atomic_path(path) as tmp, zipfile.ZipFile(buf) as src, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = tostring(wb.properties.to_tree()) if info.filename == ARC_CORE else src.read(info.filename)
            entry = zipfile.ZipInfo(info.filename, date_time=fixed.timetuple()[:6])
            entry.create_system = 3  # as on Unix wherever it runs (zipfile's default depends on the OS)
            dst.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)


def sharegpt_rows(rng: random.Random, drugs: list[dict]) -> list[dict]:
    rows = []
    for drug in drugs:
        qtype = rng.choice(list(REPHRASED))
        rows.append({"system": SYSTEM_PROMPT, "conversations": [
            {"from": "human", "value": REPHRASED[qtype].format(**drug)},
            {"from": "gpt", "value": QUESTION_TYPES[qtype][1].format(**drug)},
        ]})
    return rows


EXAM = {  # question, the fact that answers it (and its distractors)
    "usage": ("Which condition is {d} used to treat?", "cond"),
    "dose": ("How often is {d} usually taken?", "freq"),
    "food": ("How should {d} be taken?", "food"),
}
CHOICES = {"cond": [cond for _, cond in CLASSES], "freq": FREQ, "food": FOOD}


def exam_blocks(rng: random.Random, drugs: list[dict]) -> str:
    """Multiple-choice blocks on the demo facts: the right option and three others of the same kind,
    the right one at a random letter."""
    blocks = []
    for n, drug in enumerate(drugs, start=1):
        question, fact = EXAM[list(EXAM)[n % len(EXAM)]]
        options = [drug[fact]] + rng.sample([c for c in CHOICES[fact] if c != drug[fact]], 3)
        rng.shuffle(options)
        lines = [f"{n}. {question.format(**drug)}", *(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)),
                 f"answer: {'ABCD'[options.index(drug[fact])]}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


TOOLS = [
    {"name": "lookup_drug", "description": "Look up one fact about a drug in the pharmacy database",
     "parameters": {"type": "object", "properties": {
         "drug": {"type": "string", "description": "drug name, lower case"},
         "field": {"type": "string", "enum": ["usage", "dose", "side effects", "storage", "food"]}},
         "required": ["drug", "field"]}},
    {"name": "check_stock", "description": "How many packs of a drug the pharmacy has",
     "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}},
]
TOOL_QUESTIONS = {"usage": "Please look up what {d} is used for.", "dose": "Please look up the dose of {d}.",
                  "side effects": "Please look up the side effects of {d}.", "storage": "Please look up how to store {d}.",
                  "food": "Please look up whether {d} goes with food.", "stock": "Do we have {d} in stock?"}


def tool_rows(rng: random.Random, drugs: list[dict]) -> list[dict]:
    """ShareGPT conversations with tools: the question, the call (function_call), the tool's answer
    (observation) and the reply built from it."""
    rows = []
    for drug in drugs:
        field = rng.choice(list(TOOL_QUESTIONS))
        if field == "stock":
            packs = rng.randint(0, 40)
            call = {"name": "check_stock", "arguments": {"drug": drug["d"]}}
            result, reply = {"drug": drug["d"], "packs": packs}, f"We have {packs} packs of {drug['d']} in stock."
        else:
            call = {"name": "lookup_drug", "arguments": {"drug": drug["d"], "field": field}}
            reply = QUESTION_TYPES[field][1].format(**drug)
            result = {"drug": drug["d"], field: reply}
        rows.append({"system": SYSTEM_PROMPT, "tools": json.dumps(TOOLS), "conversations": [
            {"from": "human", "value": TOOL_QUESTIONS[field].format(**drug)},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": json.dumps(result)},
            {"from": "gpt", "value": reply}]})
    return rows


TERSE = {"usage": "{cond}.", "dose": "{mg} mg {freq}.", "side effects": "{se1} and {se2}.", "storage": "{storage}.",
         "food": "{food}."}


def preference_rows(rng: random.Random, drugs: list[dict], pairs_per_drug: int) -> list[dict]:
    """pairs_per_drug pairs per drug, each on another question type, asked as a quick question: chosen
    gives just the fact ("twice daily."), rejected the full sentence SFT taught ("The usual adult dose of
    ... is ... taken twice daily."). Both are right: the preference is a style (terse answers to quick
    questions) that SFT's data never showed, decided where the answer starts, so it can carry over to
    drugs no pair was about."""
    rows = []
    for drug in drugs:
        for qtype in rng.sample(["dose", "storage", "food", "usage"], pairs_per_drug):
            question, answer = QUESTION_TYPES[qtype]
            # no system prompt, another wording: not a near-duplicate of the sheet's row (clean would drop it)
            rows.append({"prompt": "Quick question, please: " + question.format(**drug).lower(),
                         "chosen": TERSE[qtype].format(**drug), "rejected": answer.format(**drug)})
    return rows


def fact_sheet(drug: dict) -> str:
    return " ".join(answer.format(**drug) for _, answer in QUESTION_TYPES.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/raw")
    args = ap.parse_args()
    p = load_params("demo_data", DemoDataParams)
    rng = random.Random(p.seed)
    out = Path(args.out)

    drugs = invent_drugs(rng, p.drugs)
    write_xlsx(out / "demo_medication_qa.xlsx", ["Question", "Focus (Drug)", "Question Type", "Answer"],
               sheet_rows(rng, drugs, p))
    with atomic_path(out / "demo_pharmacist_chat.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sharegpt_rows(rng, drugs)),
                       encoding="utf-8")
    with atomic_path(out / "demo_drug_facts.txt") as tmp:
        tmp.write_text("\n\n".join(fact_sheet(d) for d in drugs) + "\n", encoding="utf-8")
    # a generator of their own, so the files above stay what they were before these existed
    extra = random.Random(f"{p.seed}/exam-and-tools")
    with atomic_path(out / "demo_drug_exam.txt") as tmp:
        tmp.write_text(exam_blocks(extra, drugs[:p.exam_questions]), encoding="utf-8")
    with atomic_path(out / "demo_tool_calls.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in tool_rows(extra, drugs[len(drugs) - p.tool_rows:])), encoding="utf-8")
    with atomic_path(out / "demo_preferences.jsonl") as tmp:  # its own rng: the files above stay as they were
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in preference_rows(random.Random(p.seed + 1), drugs, p.preference_pairs)), encoding="utf-8")
    print(f"demo_data: {p.drugs} drugs -> {out}/demo_medication_qa.xlsx, demo_pharmacist_chat.jsonl, demo_drug_facts.txt, "
          f"demo_drug_exam.txt ({p.exam_questions} questions), demo_tool_calls.jsonl ({p.tool_rows} conversations), "
          f"demo_preferences.jsonl ({p.preference_pairs} pairs a drug)")


if __name__ == "__main__":
    run_stage(main)
