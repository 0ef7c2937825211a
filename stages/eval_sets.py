"""The eval stage's sets: which test rows each set scores, and their OpenCompass dataset entries.

- generative (eval.dataset, e.g. demo_qa): every test conversation that is neither of the two below;
  the final assistant turn is generated and scored by ROUGE (stages/eval.py).
- mcq (eval.mcq.name): test records with "mcq" (stages/mcq.py). Accuracy through OpenCompass, by
  eval.mcq.mode: `ppl` scores every option's letter after the prompt (rendered with the pipeline's
  chat template) by perplexity and picks the likeliest (OpenCompass's PPLInferencer, run on
  HuggingFaceBaseModel entries: its chat model class has no perplexity); `gen` generates a reply
  and reads its option letter with stages.mcq.option_letter.
- tool calls (eval.tool_calls.name): test records whose assistant calls a tool (stages/tool_calls.py);
  the first call is generated and checked: tool name, arguments valid JSON, equal to the reference.
- eval.opencompass_datasets: OpenCompass's own dataset configs by name (ceval_gen, cmmlu_ppl, ...),
  scored as OpenCompass defines them where their data is on this machine (COMPASS_DATA_CACHE or
  ~/.cache/opencompass); without it the set is skipped and metrics/eval.json says so.
A set with no test rows is left out (the demo's test split has all three kinds).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages import chat_template, tool_calls
from stages.common import Params, StageError
from stages.mcq import LETTERS

SET_NAME = r"^[A-Za-z0-9_-]+$"
PLUGINS = "stages.oc_plugins"  # OpenCompass imports the evaluators from here (PYTHONPATH: the repository)


class McqSet(Params):
    name: str = Field("mcq", pattern=SET_NAME)       # the key in metrics/eval.json
    mode: Literal["ppl", "gen"] = "ppl"              # ppl: likeliest option letter; gen: parse the reply
    max_new_tokens: int = Field(16, ge=1)            # gen


class ToolCallSet(Params):
    name: str = Field("tool_calls", pattern=SET_NAME)
    max_new_tokens: int = Field(128, ge=1)


def kind(record: dict) -> str:
    """Which set a test record belongs to: "mcq", "tool_calls" or "generative"."""
    if record.get("mcq"):
        return "mcq"
    if tool_calls.reference_call(record) is not None:
        return "tool_calls"
    return "generative"


def plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def mcq_rows(records: list[dict], max_samples: int) -> list[dict]:
    """{id, messages (up to the answer), prompt turns' answer letter, options (the letters)}."""
    rows = []
    for r in records:
        messages = r["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append({"id": r["id"], "messages": plain(messages[:last]) + [{"role": "assistant",
                                                                            "content": r["mcq"]["answer"]}],
                     "answer": r["mcq"]["answer"], "options": LETTERS[:len(r["mcq"]["options"])]})
    return rows[:max_samples] if max_samples > 0 else rows


def tool_rows(records: list[dict], max_samples: int) -> list[dict]:
    """{id, messages (up to and with the first call), answer: the reference call as JSON text}."""
    rows = []
    for r in records:
        index, call = tool_calls.reference_call(r)
        if index == 0 or not any(m["role"] == "user" for m in r["messages"][:index]):
            raise StageError(f"test record {r['id']}: its first tool call has no user turn before it")
        rows.append({"id": r["id"], "messages": plain(r["messages"][:index + 1]),
                     "answer": json.dumps(call, ensure_ascii=False, sort_keys=True),
                     **({"tools": r["tools"]} if r.get("tools") else {})})
    return rows[:max_samples] if max_samples > 0 else rows


def fold_tools(rows: list[dict], tokenizer) -> list[dict]:
    """Rows with "tools": the tools written into the prompt's system message as the chat template
    renders them (chat_template.system_with_tools), since OpenCompass renders messages without tools;
    the model sees the prompt training gave it. The answer turn stays as it is."""
    out = []
    for r in rows:
        if not r.get("tools"):
            out.append(r)
            continue
        try:
            prompt = chat_template.system_with_tools(tokenizer, r["messages"][:-1], r["tools"])
        except chat_template.TemplateError as e:
            raise StageError(f"test record {r['id']}: {e}") from None
        out.append({k: v for k, v in r.items() if k != "tools"} | {"messages": [*plain(prompt), r["messages"][-1]]})
    return out


def with_ppl_prompts(rows: list[dict], tokenizer) -> list[dict]:
    """Each mcq row with "prompt": its turns rendered by the chat template, ready for the answer."""
    return [{**r, "prompt": tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                                          tokenize=False)} for r in rows]


# ---------------------------------------------------------------------------------------------
# OpenCompass dataset entries (text for the config eval writes)
# ---------------------------------------------------------------------------------------------
CHAT_DATASET = '''
    dict(
        abbr={abbr!r},
        type='opencompass.datasets.CustomDataset',
        path='{{{{ fileDirname }}}}/data/{abbr}.jsonl',
        # one conversation per row; the model writes the final assistant turn of `messages`
        reader_cfg=dict(input_columns=['messages'], output_column='answer'),
        infer_cfg=dict(
            # `messages` is already a chat: ChatInferencer takes it as is (the template is required by
            # OpenCompass's infer task but not applied to a chat column)
            prompt_template=dict(type='opencompass.openicl.icl_prompt_template.PromptTemplate',
                                 template='{{messages}}'),
            retriever=dict(type='opencompass.openicl.icl_retriever.ZeroRetriever'),
            # infer_mode='last': generate the final assistant turn given every turn before it
            inferencer=dict(type='opencompass.openicl.icl_inferencer.ChatInferencer', infer_mode='last',
                            max_out_len={max_new_tokens}),
        ),
        eval_cfg=dict(evaluator={evaluator}),
    ),'''

PPL_DATASET = '''
    dict(
        abbr={abbr!r},
        type='opencompass.datasets.CustomDataset',
        path='{{{{ fileDirname }}}}/data/{abbr}.jsonl',
        # `prompt` is the question's turns rendered by the chat template; each option's letter and the
        # end-of-turn token follow it, and the likeliest (lowest perplexity) is the model's answer
        reader_cfg=dict(input_columns=['prompt'], output_column='answer'),
        infer_cfg=dict(
            prompt_template=dict(type='opencompass.openicl.icl_prompt_template.PromptTemplate',
                                 template={templates!r}),
            retriever=dict(type='opencompass.openicl.icl_retriever.ZeroRetriever'),
            inferencer=dict(type='opencompass.openicl.icl_inferencer.PPLInferencer'),
        ),
        eval_cfg=dict(evaluator={evaluator}),
    ),'''

ROUGE = "dict(type='opencompass.openicl.icl_evaluator.RougeEvaluator')"


def chat_entry(abbr: str, max_new_tokens: int, evaluator: str = ROUGE) -> str:
    return CHAT_DATASET.format(abbr=abbr, max_new_tokens=max_new_tokens, evaluator=evaluator)


def mcq_evaluator(rows: list[dict]) -> str:
    letters = max((r["options"] for r in rows), key=len)
    return f"dict(type='{PLUGINS}.OptionAccuracyEvaluator', options={letters!r})"


def mcq_gen_entry(s: McqSet, rows: list[dict]) -> str:
    return chat_entry(s.name, s.max_new_tokens, mcq_evaluator(rows))


def mcq_ppl_entry(s: McqSet, rows: list[dict], end_of_turn: str) -> str:
    """Labels are the letters of the question with the most options: a question with fewer may
    still be scored on a letter it does not have (and is then wrong)."""
    letters = max((r["options"] for r in rows), key=len)
    templates = {letter: "{prompt}" + letter + end_of_turn for letter in letters}
    return PPL_DATASET.format(abbr=s.name, templates=templates, evaluator=mcq_evaluator(rows))


def tool_entry(s: ToolCallSet) -> str:
    return chat_entry(s.name, s.max_new_tokens, f"dict(type='{PLUGINS}.ToolCallEvaluator')")


# ---------------------------------------------------------------------------------------------
# OpenCompass's own dataset configs, by name
# ---------------------------------------------------------------------------------------------
def find_dataset_config(name: str) -> Path:
    import opencompass

    root = Path(opencompass.__file__).parent / "configs"
    hits = sorted((root / "datasets").glob(f"**/{name}.py")) + sorted((root / "dataset_collections").glob(f"**/{name}.py"))
    if not hits:
        raise StageError(f"params.yaml: eval.opencompass_datasets: no OpenCompass dataset config named '{name}' "
                         f"(looked under {root}/datasets)")
    return hits[0]


def local_data(path: str) -> str | None:
    """Where a dataset's data is on this machine, found as OpenCompass's get_data_path finds it
    (without its download): COMPASS_DATA_CACHE, then ~/.cache/opencompass; None when absent."""
    from opencompass.utils.datasets_info import DATASETS_MAPPING

    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    local = (DATASETS_MAPPING.get(path) or {}).get("local") or path
    for cand in (os.path.join(os.environ.get("COMPASS_DATA_CACHE", ""), local),
                 os.path.join(os.path.expanduser("~/.cache/opencompass"), local)):
        if os.path.exists(cand):
            return cand
    return None


def as_config_value(value):
    """A loaded dataset config as plain values: classes and functions by their import path."""
    if isinstance(value, dict):
        return {k: as_config_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_config_value(v) for v in value)
    if isinstance(value, type) or callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def named_datasets(names: list[str]) -> tuple[list[dict], dict[str, list[str]], dict[str, str]]:
    """(dataset configs to run, {name: their abbrs}, {name: why it is skipped}) for eval.opencompass_datasets."""
    from mmengine.config import Config

    datasets, abbrs, skipped = [], {}, {}
    for name in dict.fromkeys(names):
        cfg = Config.fromfile(str(find_dataset_config(name)))
        found = [as_config_value(d.to_dict() if hasattr(d, "to_dict") else d)
                 for key in cfg.keys() if key.endswith("_datasets") for d in cfg[key]]
        missing = sorted({d["path"] for d in found if isinstance(d.get("path"), str) and local_data(d["path"]) is None})
        if not found:
            raise StageError(f"params.yaml: eval.opencompass_datasets: '{name}' defines no *_datasets")
        if missing:
            skipped[name] = (f"no local data for {', '.join(missing)} (set COMPASS_DATA_CACHE to the folder "
                             "holding it; nothing is downloaded)")
            print(f"eval: skipping OpenCompass dataset {name}: {skipped[name]}", flush=True)
            continue
        datasets += found
        abbrs[name] = [d["abbr"] for d in found]
    return datasets, abbrs, skipped


def named_entries(datasets: list[dict]) -> str:
    return "".join(f"\n    {d!r}," for d in datasets)


# ---------------------------------------------------------------------------------------------
# The comparison: one table of every set x model x metric, and the predictions side by side
# ---------------------------------------------------------------------------------------------
def score_rows(metrics: dict) -> list[dict]:
    """metrics/eval.json's {set: {model: {metric: value}}} as rows {metric: "set/metric", model, score}
    for plots/eval_scores.csv (skipped sets have no rows)."""
    rows = []
    for set_name, by_model in metrics.items():
        if "skipped" in by_model:
            continue
        for model, scores in by_model.items():
            rows += [{"metric": f"{set_name}/{metric}", "model": model, "score": value}
                     for metric, value in scores.items()]
    return rows


def by_sample(predictions: list[dict]) -> list[dict]:
    """eval/predictions.jsonl's rows (one per set, sample and model) as one row per set and sample
    with every model's prediction (and, for mcq and tool calls, what was read from it) side by side."""
    out: dict[tuple, dict] = {}
    for p in predictions:
        row = out.setdefault((p["set"], p["id"]), {"set": p["set"], "id": p["id"], "prompt": p["prompt"],
                                                   "reference": p["reference"], "predictions": {}})
        row["predictions"][p["model"]] = p["prediction"]
        if "read" in p:
            row.setdefault("read", {})[p["model"]] = p["read"]
            row.setdefault("correct", {})[p["model"]] = p["correct"]
    return list(out.values())


def read_back(set_kind: str, prediction: str, row: dict) -> dict:
    """What the scorer read from a prediction: the option letter, or the tool call."""
    if set_kind == "mcq":
        from stages.mcq import option_letter

        letter = option_letter(str(prediction), row["options"])
        return {"read": letter, "correct": letter == row["answer"]}
    if set_kind == "tool_calls":
        result = tool_calls.score_one(str(prediction), json.loads(row["answer"]))
        return {"read": result["called"], "correct": result["accuracy"]}
    return {}
