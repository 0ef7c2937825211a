"""eval: score the base, merged and quantized models on the test split's sets with OpenCompass.

Runs in .venvs/opencompass (opencompass 0.5.4 pins numpy<2 and datasets<4, so it has its own env):
    .venvs/opencompass/bin/python -m stages.eval

1. Read the test split and keep, per conversation, everything up to its final assistant turn.
   The model is asked for that turn given the earlier ones (system prompt included), rendered with
   the base model's own chat template (the one in models/base), stopping at its end-of-turn
   token (stages/chat_template.py), exactly as in training.
2. Prepare each model OpenCompass should run: base (models/base, or the hub model its manifest
   pins), merged (models/merged) and the W4A16 AWQ artifact made for lmdeploy's TurboMind
   (models/turbomind). eval.quantized_via (stages/eval_served.py) picks how the artifact is run:
   through `tunepipe serve` and its OpenAI-compatible API (`turbomind_w4a16_served`; auto where
   CUDA and lmdeploy are), or, the labelled CPU fallback, its packed int4 weights dequantized back
   into a plain HF model (`turbomind_w4a16_dequant`: the same quantized weights, run by
   transformers instead of lmdeploy's kernels).
3. Write an OpenCompass config (stages/eval_config.py: a custom chat dataset over the test rows,
   ChatInferencer in `last` mode = greedy generation of the final turn, ROUGE from OpenCompass's RougeEvaluator,
   HuggingFacewithChatTemplate models, eval.batch_size conversations at a time) that a user can
   rerun as-is:
       .venvs/opencompass/bin/opencompass eval/opencompass_config.py
4. Run it through OpenCompass's own entry point (`python -m opencompass.cli.main <config>`),
   parse outputs/<name>/run/summary/summary.csv into metrics/eval.json, and
   collect the per-sample predictions into eval/predictions.jsonl.

Sets (stages/eval_sets.py): besides the generative rows above, the test split's multiple-choice
records are scored by accuracy (eval.mcq.mode ppl: a second OpenCompass run, opencompass_ppl_config.py,
picks the likeliest option letter; gen: the reply's letter), its tool-calling records by the
tool-call check (stages/tool_calls.py), and eval.opencompass_datasets by OpenCompass's own configs
(skipped, and recorded as skipped, without local data). metrics/eval.json is
{set: {model: {metric: value}}}; plots/eval_scores.csv the same as rows for the DVC plot; and
eval/predictions_by_sample.jsonl every model's prediction side by side per set and sample.

Device (hf_run_settings): eval.device auto puts every model on the GPU when there is one
(model_kwargs device_map cuda, run_cfg num_gpus=1; eval.dtype auto = bfloat16, the dequantized
AWQ model in eval.turbomind_dtype as TurboMind computes in fp16) and on the CPU otherwise
(device_map cpu, num_gpus=0, float32).

Everything under eval/ is written to a temporary sibling and renamed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages import eval_sets, eval_served
from stages.eval_config import CHAT_META_TEMPLATE, OC_RUN_DIR, PPL_MODEL, PPL_RUN_NAME, RUN_NAME, write_config
from stages.awq import dequantize_linear
from stages.chat_template import stop_token_ids
from stages.common import (Params, StageError, atomic_path, load_base_tokenizer, load_params, pick_device,
                           read_jsonl, resolve_base, run_stage, write_json, write_jsonl)
from stages.remote_code import load_kwargs

ModelName = Literal["base", "merged", "turbomind"]


class EvalParams(Params):
    models: list[ModelName] = ["base", "merged", "turbomind"]  # which models to score
    dataset: str = Field("demo_qa", pattern=r"^[A-Za-z0-9_-]+$")  # OpenCompass dataset abbr, metrics key
    max_samples: int = Field(0, ge=0)          # first N test conversations (0 = all)
    max_new_tokens: int = Field(64, ge=1)      # greedy decoding, stops at the template's end-of-turn token
    max_seq_len: int | None = Field(None, ge=1)  # prompt tokens kept (cut on the left); None: the model's max
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible, else cpu
    batch_size: int = Field(8, ge=1)           # conversations generated together (left-padded)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # HF compute dtype; auto: bf16 on cuda, fp32 on cpu
    turbomind_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # dequantized weights;
    # TurboMind's W4A16 kernels dequantize to fp16 too, so float16 mirrors what it computes.
    mcq: eval_sets.McqSet = eval_sets.McqSet()                  # the test split's multiple-choice records
    tool_calls: eval_sets.ToolCallSet = eval_sets.ToolCallSet()  # its tool-calling records
    opencompass_datasets: list[str] = []                        # OpenCompass dataset configs by name
    quantized_via: Literal["auto", "server", "dequantized"] = "auto"  # stages/eval_served.py


TURBOMIND_ABBR = "turbomind_w4a16_dequant"
CONFIG_NAME, PPL_CONFIG_NAME = "opencompass_config.py", "opencompass_ppl_config.py"  # the latter: eval.mcq.mode ppl


# ---------------------------------------------------------------------------------------------
# 1. test rows
# ---------------------------------------------------------------------------------------------
def read_test(test_path: Path) -> list[dict]:
    if not test_path.exists():
        raise StageError(f"{test_path}: test split not found (run the split stage)")
    records = read_jsonl(test_path)
    if not records:
        raise StageError(f"{test_path}: no test rows")
    return records


def eval_rows(test_path: Path, max_samples: int, records: list[dict] | None = None) -> list[dict]:
    """One row per generative conversation (not an mcq or tool-call record; eval_sets.kind): messages
    up to and including the final assistant turn."""
    rows = []
    for n, row in enumerate(read_test(test_path) if records is None else records, start=1):
        if eval_sets.kind(row) != "generative":
            continue
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            raise StageError(f"{test_path}: row {n} (id {row.get('id')}): column 'messages' has no "
                             "assistant turn after a prompt to score")
        convo = [{"role": m["role"], "content": m["content"]} for m in messages[:last + 1]]
        rows.append({"id": row.get("id", str(n)), "messages": convo, "answer": convo[-1]["content"],
                     **({"tools": row["tools"]} if row.get("tools") else {})})
    return rows[:max_samples] if max_samples > 0 else rows


# ---------------------------------------------------------------------------------------------
# 2. models
# ---------------------------------------------------------------------------------------------
def find_awq_dir(artifact: Path) -> Path:
    """The folder holding the HF-format AWQ checkpoint (config.json with quantization_config):
    the artifact itself, or one folder below it."""
    for cand in [artifact, *sorted(p for p in artifact.iterdir() if p.is_dir())]:
        cfg = cand / "config.json"
        if cfg.exists() and "quantization_config" in json.loads(cfg.read_text(encoding="utf-8")):
            return cand
    raise StageError(f"{artifact}: no config.json with a quantization_config (not an lmdeploy AWQ checkpoint)")


def dequantize_awq(src: Path, dst: Path, dtype: str) -> dict:
    """Write an HF model at `dst` whose linear weights are the AWQ checkpoint's int4 weights,
    dequantized. Returns a note for eval/summary.json."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    qcfg = cfg.pop("quantization_config")
    if (qcfg.get("quant_method"), qcfg.get("version", "gemm"), qcfg.get("bits")) != ("awq", "gemm", 4) \
            or not qcfg.get("zero_point", True):
        raise StageError(f"{src}/config.json: quantization_config {qcfg} is not 4-bit AWQ gemm with zero points")
    group = int(qcfg["group_size"])
    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    if not tensors:
        raise StageError(f"{src}: no *.safetensors weights")
    target = getattr(torch, dtype)
    out, n_quant = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            w = dequantize_linear(t, tensors[prefix + ".qzeros"], tensors[prefix + ".scales"], group)
            out[prefix + ".weight"] = w.to(target)
            n_quant += 1
        elif name.endswith((".qzeros", ".scales")) and name.rsplit(".", 1)[0] + ".qweight" in tensors:
            continue
        else:
            out[name] = t.to(target) if t.is_floating_point() else t
    if n_quant == 0:
        raise StageError(f"{src}: no packed (.qweight) tensors found")
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in sorted(src.iterdir()):  # tokenizer, chat template, generation config
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, dst / f.name)
    return {"source": str(src), "quantization_config": qcfg, "dequantized_linears": n_quant, "dtype": dtype,
            "note": "TurboMind's W4A16 AWQ weights were dequantized ((q - zero) * scale) and run by "
                    "transformers. Scores reflect the quantized weights, not TurboMind's kernels."}


def opencompass_prompt(model_path: str, messages: list[dict]) -> str:
    """The text OpenCompass feeds a model of the written config for `messages` (the turns before
    the one to generate), built with OpenCompass's own pieces in the order a run uses them:
    ChatInferencer's template parser with CHAT_META_TEMPLATE, HuggingFacewithChatTemplate's
    message conversion, then the tokenizer's chat template. Needs .venvs/opencompass."""
    from opencompass.models.huggingface_above_v4_33 import _convert_chat_messages
    from opencompass.openicl.icl_inferencer.icl_chat_inferencer import APITemplateParser
    from transformers import AutoTokenizer

    [chat] = _convert_chat_messages([APITemplateParser(CHAT_META_TEMPLATE).parse_template(messages)])
    tokenizer = AutoTokenizer.from_pretrained(model_path, **load_kwargs(model_path))
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def tokenizer_dir(base_dir: str) -> Path | str:
    """Where the base tokenizer with the pipeline's chat template lives (the base stage writes it)."""
    return Path(base_dir) if (Path(base_dir) / "tokenizer_config.json").exists() else resolve_base(base_dir)[0]


def stop_words(base_dir: str) -> tuple[list[str], int]:
    """The template's end-of-turn token(s), as text: every model stops where training taught it to;
    and the id batches are padded with (the tokenizer's pad, else the end-of-turn token: Llama-3
    ships no pad token, and OpenCompass would look for one in a generation config)."""
    tokenizer = load_base_tokenizer(base_dir)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return tokenizer.convert_ids_to_tokens(stops), pad


def is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# 4. run OpenCompass and read its results
# ---------------------------------------------------------------------------------------------
def run_opencompass(config: Path, cwd: Path, run_name: str = RUN_NAME) -> Path:
    """`opencompass <config>` in a subprocess of this env; returns outputs/<name>/run/."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])  # OpenCompass imports stages.oc_plugins's evaluators
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(k, "1")  # everything is local: models from disk, metrics from opencompass
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenCompass names a run's folder after its start time; `--reuse run` names it `run` instead
    # (cwd is the stage's fresh temporary folder: there is nothing to reuse), so that eval/ depends
    # on its inputs only and a rerun, or a killed stage run again, writes the same bytes
    cmd = [sys.executable, "-m", "opencompass.cli.main", config.name, "--reuse", OC_RUN_DIR]
    print(f"eval: running {' '.join(cmd)} (in {cwd})", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    run = cwd / "outputs" / run_name / OC_RUN_DIR
    if proc.returncode != 0 or not run.is_dir():
        raise StageError(f"opencompass exited {proc.returncode} on {config.name}; its output is above")
    # scratch left behind: the runner's tmp/ (params of finished tasks), ChatInferencer's default
    # ./icl_inference_output/ (unused) and its tmp_<dataset>.json checkpoints (it deletes a .jsonl name)
    for scratch in ("tmp", "icl_inference_output"):
        if (cwd / scratch).is_dir() and not any((cwd / scratch).iterdir()):
            (cwd / scratch).rmdir()
    for tmp_pred in run.glob("predictions/*/tmp_*.json"):
        if tmp_pred.with_name(tmp_pred.name[len("tmp_"):]).exists():
            tmp_pred.unlink()
    unstamp(run)
    return run


def unstamp(run: Path) -> None:
    """What OpenCompass stamps with the start time, made to depend on the inputs only: its dump of the
    config (configs/<time>_<pid>.py, with absolute paths into this run's temporary folder) is dropped,
    eval/opencompass_config.py being the config it ran; the summary tables get fixed names
    (summary/summary_<time>.{csv,md,txt} -> summary.*), the .txt without its first line (the time)."""
    shutil.rmtree(run / "configs", ignore_errors=True)
    for table in run.glob("summary/summary_*"):
        if table.suffix == ".txt":
            first, _, rest = table.read_text(encoding="utf-8").partition("\n")
            table.write_text(rest if first.replace("_", "").isdigit() else first + "\n" + rest, encoding="utf-8")
        table.rename(table.with_name("summary" + table.suffix))


def read_summary(run_dir: Path, dataset: str | list[str], abbrs: list[str]) -> dict:
    """summary.csv (dataset,version,metric,mode,<model abbr>...) -> {model: {metric: score}};
    for several datasets (one named OpenCompass config) the metrics are "<dataset>/<metric>"."""
    names = [dataset] if isinstance(dataset, str) else dataset
    table = run_dir / "summary" / "summary.csv"
    if not table.exists():
        raise StageError(f"{table}: not written; see opencompass's output above")
    scores: dict = {a: {} for a in abbrs}
    with open(table, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["dataset"] not in names:
                continue
            metric = row["metric"] if isinstance(dataset, str) else f"{row['dataset']}/{row['metric']}"
            for a in abbrs:
                try:
                    scores[a][metric] = float(row[a])
                except (KeyError, ValueError):
                    raise StageError(f"{table}: no score for model {a}, metric {row['metric']} "
                                     f"(got {row.get(a)!r}); see opencompass's output above") from None
    missing = [a for a in abbrs if not scores[a]]
    if missing:
        raise StageError(f"{table}: no {dataset} rows for {missing}; see opencompass's output above")
    return scores


def read_predictions(run_dir: Path, dataset: str, abbrs: list[str], rows: list[dict], kind: str = "generative") -> list[dict]:
    out = []
    for a in abbrs:
        path = run_dir / "predictions" / a / f"{dataset}.json"
        preds = json.loads(path.read_text(encoding="utf-8"))
        if len(preds) != len(rows):
            raise StageError(f"{path}: {len(preds)} predictions for {len(rows)} test rows")
        for i, row in enumerate(rows):
            pred = preds[str(i)]
            out.append({"set": dataset, "model": a, "id": row["id"], "prompt": row["messages"][:-1],
                        "prediction": pred["prediction"], "reference": row["answer"],
                        **eval_sets.read_back(kind, pred["prediction"], row)})
    return out


def prepare_models(args, p: EvalParams, tmp: Path, device: str,
                   servers: contextlib.ExitStack) -> tuple[list[dict], dict]:
    """The model entries to score (base, merged, the AWQ artifact served or dequantized) and notes on
    them. A server started for the artifact lives as long as `servers`."""
    models, notes = [], {}
    for name in dict.fromkeys(p.models):
        if name == "base":
            if not (Path(args.base) / "manifest.json").exists():
                raise StageError(f"{args.base}/manifest.json: not found (run the base stage)")
            path, load = resolve_base(args.base)
            models.append({"abbr": "base", "path": path, **load, "tokenizer_path": str(tokenizer_dir(args.base))})
        elif name == "merged":
            if not is_hf_model_dir(Path(args.merged)):
                raise StageError(f"{args.merged}: not a Hugging Face model folder (config.json + *.safetensors)")
            models.append({"abbr": "merged", "path": args.merged, **load_kwargs(args.merged)})
        else:
            artifact = Path(args.turbomind)
            if not artifact.exists():
                raise StageError(f"{artifact}: TurboMind artifact not found (run the turbomind stage)")
            backend = eval_served.server_backend(p.quantized_via)
            if backend:
                served = servers.enter_context(eval_served.quantized_server(artifact, backend))
                models.append({**served, "tokenizer_path": str(tokenizer_dir(args.base))})
                notes[served["abbr"]] = eval_served.note(served)
                continue
            try:
                notes[TURBOMIND_ABBR] = dequantize_awq(find_awq_dir(artifact), tmp / "models" / TURBOMIND_ABBR,
                                                       p.turbomind_dtype)
            except StageError as e:  # recorded, not fatal: the other models are still scored
                notes["turbomind"] = {"scored": False, "reason": str(e)}
                print(f"eval: warning: turbomind not scored: {e}", file=sys.stderr)
                continue
            dequantized = tmp / "models" / TURBOMIND_ABBR
            # on a GPU, eval.dtype auto runs it in fp16 (turbomind_dtype) as TurboMind's kernels compute
            models.append({"abbr": TURBOMIND_ABBR, "path": str(dequantized), **load_kwargs(dequantized),
                           "dtype": p.turbomind_dtype if device == "cuda" and p.dtype == "auto" else None})
    if not models:
        raise StageError(f"no model to score (eval.models: {p.models}; notes: {notes})")
    return models, notes


def test_sets(test_path: Path, p: EvalParams, base_dir: str) -> dict[str, tuple[str, list[dict]]]:
    """{set name: (kind, rows)} of the test split's sets that have rows, generative first."""
    names = [p.dataset, p.mcq.name, p.tool_calls.name, *p.opencompass_datasets]
    if len(set(names)) < len(names):
        raise StageError(f"params.yaml: eval: set names must differ (dataset, mcq.name, tool_calls.name, "
                         f"opencompass_datasets: {names})")
    records = read_test(test_path)
    sets = {p.dataset: ("generative", eval_rows(test_path, p.max_samples, records)),
            p.mcq.name: ("mcq", eval_sets.mcq_rows([r for r in records if eval_sets.kind(r) == "mcq"], p.max_samples)),
            p.tool_calls.name: ("tool_calls", eval_sets.tool_rows(
                [r for r in records if eval_sets.kind(r) == "tool_calls"], p.max_samples))}
    if any(r.get("tools") for _, rows in sets.values() for r in rows):  # OpenCompass passes no tools
        tokenizer = load_base_tokenizer(base_dir)
        sets = {name: (kind, eval_sets.fold_tools(rows, tokenizer)) for name, (kind, rows) in sets.items()}
    if p.mcq.mode == "ppl" and sets[p.mcq.name][1]:
        sets[p.mcq.name] = ("mcq", eval_sets.with_ppl_prompts(sets[p.mcq.name][1], load_base_tokenizer(base_dir)))
    return {name: kind_rows for name, kind_rows in sets.items() if kind_rows[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--merged", default="models/merged")
    ap.add_argument("--turbomind", default="models/turbomind")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--out", default="eval")
    ap.add_argument("--metrics", default="metrics/eval.json")
    ap.add_argument("--scores-plot", default="plots/eval_scores.csv")
    args = ap.parse_args()
    p = load_params("eval", EvalParams)
    if not p.models:
        raise StageError("params.yaml: eval.models is empty")

    sets = test_sets(Path(args.test), p, args.base)
    named, named_abbrs, skipped = eval_sets.named_datasets(p.opencompass_datasets)
    if not sets and not named:
        raise StageError(f"{args.test}: no test rows to score, and no OpenCompass dataset with local data")
    device = pick_device(p.device)
    final_dir = Path(args.out)
    with atomic_path(final_dir, is_dir=True) as tmp, contextlib.ExitStack() as servers:
        tmp = tmp.resolve()
        for name, (_, rows) in sets.items():
            write_jsonl(tmp / "data" / f"{name}.jsonl", rows)
        models, notes = prepare_models(args, p, tmp, device, servers)
        abbrs = [m["abbr"] for m in models]
        ranked = [m for m in models if "api" not in m]   # ppl needs logits: API models are left out
        stops, pad = stop_words(args.base)
        ppl = p.mcq.name if p.mcq.mode == "ppl" and p.mcq.name in sets else None
        api_models = [m["abbr"] for m in models if "api" in m]
        if ppl and api_models:
            notes["not_scored"] = {ppl: {a: "mcq ppl needs logits; an API model has none (eval.mcq.mode gen scores it)"
                                         for a in api_models}}
            if not ranked:
                sets.pop(ppl)
                ppl = None
        chat_entries = {name: eval_sets.chat_entry(name, p.max_new_tokens) if kind == "generative"
                        else eval_sets.tool_entry(p.tool_calls) if kind == "tool_calls"
                        else eval_sets.mcq_gen_entry(p.mcq, rows)
                        for name, (kind, rows) in sets.items() if name != ppl}
        # The configs name local folders relative to themselves. They are written in the temporary
        # sibling of eval/, so the same relative paths hold once it is renamed into place.
        metrics, predictions, runs = {}, [], {}
        if chat_entries or named:
            write_config(tmp / CONFIG_NAME, final_dir, p, models, device, stops, pad,
                         "".join(chat_entries.values()) + eval_sets.named_entries(named))
            runs[CONFIG_NAME] = run_opencompass(tmp / CONFIG_NAME, cwd=tmp)
        if ppl:
            write_config(tmp / PPL_CONFIG_NAME, final_dir, p, ranked, device, stops, pad,
                         eval_sets.mcq_ppl_entry(p.mcq, sets[ppl][1], stops[0]), PPL_MODEL, PPL_RUN_NAME)
            runs[PPL_CONFIG_NAME] = run_opencompass(tmp / PPL_CONFIG_NAME, cwd=tmp, run_name=PPL_RUN_NAME)
        for name, (kind, rows) in sets.items():
            run_dir = runs[PPL_CONFIG_NAME if name == ppl else CONFIG_NAME]
            scored = [m["abbr"] for m in ranked] if name == ppl else abbrs
            metrics[name] = read_summary(run_dir, name, scored)
            predictions += read_predictions(run_dir, name, scored, rows, kind)
        for name, dataset_abbrs in named_abbrs.items():
            metrics[name] = read_summary(runs[CONFIG_NAME], dataset_abbrs, abbrs)
        metrics.update({name: {"skipped": reason} for name, reason in skipped.items()})
        write_jsonl(tmp / "predictions.jsonl", predictions)
        write_jsonl(tmp / "predictions_by_sample.jsonl", eval_sets.by_sample(predictions))
        write_json(tmp / "summary.json", {
            "dataset": p.dataset, "test_rows": len(sets.get(p.dataset, ("", []))[1]), "models": abbrs,
            "sets": {name: {"kind": kind, "rows": len(rows)} for name, (kind, rows) in sets.items()},
            "scores": metrics, "skipped": skipped, "notes": notes, "device": device, "batch_size": p.batch_size,
            "opencompass_runs": {config: run.relative_to(tmp).as_posix() for config, run in runs.items()}})

    write_json(args.metrics, metrics)
    with atomic_path(args.scores_plot) as plot, open(plot, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["metric", "model", "score"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(eval_sets.score_rows(metrics))
    for name, by_model in metrics.items():
        for a, scores in by_model.items():
            print(f"eval: {name} {a}: " + (", ".join(f"{k}={v:.2f}" for k, v in scores.items())
                                           if isinstance(scores, dict) else f"{scores}"))


if __name__ == "__main__":
    run_stage(main)
