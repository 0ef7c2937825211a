"""eval: score the base, merged and quantized models on the test split with OpenCompass.

Runs in .venvs/opencompass (opencompass 0.5.4 pins numpy<2 and datasets<4, so it has its own env):
    .venvs/opencompass/bin/python -m stages.eval

1. Read the test split and keep, per conversation, everything up to its final assistant turn.
   The model is asked for that turn given the earlier ones (system prompt included), rendered with
   the base model's own chat template (the one in models/base), stopping at its end-of-turn
   token (stages/chat_template.py), exactly as in training.
2. Prepare each model OpenCompass should run: base (models/base, or the hub model its manifest
   pins), merged (models/merged) and the W4A16 AWQ artifact made for lmdeploy's TurboMind
   (models/turbomind). lmdeploy lives in another environment, so its packed int4 weights are
   dequantized back into a plain HF model and scored as `turbomind_w4a16_dequant`: the same
   quantized weights, run by transformers instead of TurboMind's kernels.
3. Write an OpenCompass config (a custom chat dataset over the test rows, ChatInferencer in
   `last` mode = greedy generation of the final turn, ROUGE from OpenCompass's RougeEvaluator,
   HuggingFacewithChatTemplate models, eval.batch_size conversations at a time) that a user can
   rerun as-is:
       .venvs/opencompass/bin/opencompass eval/opencompass_config.py
4. Run it through OpenCompass's own entry point (`python -m opencompass.cli.main <config>`),
   parse outputs/<name>/<timestamp>/summary/summary_<timestamp>.csv into metrics/eval.json, and
   collect the per-sample predictions into eval/predictions.jsonl.

Device (hf_run_settings): eval.device auto puts every model on the GPU when there is one
(model_kwargs device_map cuda, run_cfg num_gpus=1; eval.dtype auto = bfloat16, the dequantized
AWQ model in eval.turbomind_dtype as TurboMind computes in fp16) and on the CPU otherwise
(device_map cpu, num_gpus=0, float32).

Everything under eval/ is written to a temporary sibling and renamed at the end.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.awq import dequantize_linear
from stages.chat_template import stop_token_ids
from stages.common import (Params, StageError, atomic_path, load_base_tokenizer, load_params, pick_device, pick_dtype,
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


# OpenCompass roles -> chat roles for HuggingFacewithChatTemplate. OpenCompass's default meta
# template sends SYSTEM as HUMAN (merged into the user turn); ChatML has a system turn, so keep it.
CHAT_META_TEMPLATE = dict(
    round=[dict(role="HUMAN", api_role="HUMAN"), dict(role="BOT", api_role="BOT", generate=True)],
    reserved_roles=[dict(role="SYSTEM", api_role="SYSTEM")],
)
RUN_NAME = "tunepipe_eval"                 # OpenCompass work dir: outputs/<RUN_NAME>/<timestamp>/
CONFIG_NAME = "opencompass_config.py"
TURBOMIND_ABBR = "turbomind_w4a16_dequant"


# ---------------------------------------------------------------------------------------------
# 1. test rows
# ---------------------------------------------------------------------------------------------
def eval_rows(test_path: Path, max_samples: int) -> list[dict]:
    """One row per conversation: messages up to and including the final assistant turn."""
    if not test_path.exists():
        raise StageError(f"{test_path}: test split not found (run the split stage)")
    rows = []
    for n, row in enumerate(read_jsonl(test_path), start=1):
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            raise StageError(f"{test_path}: row {n} (id {row.get('id')}): column 'messages' has no "
                             "assistant turn after a prompt to score")
        convo = [{"role": m["role"], "content": m["content"]} for m in messages[:last + 1]]
        rows.append({"id": row.get("id", str(n)), "messages": convo, "answer": convo[-1]["content"]})
    if not rows:
        raise StageError(f"{test_path}: no test rows")
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
# 3. the OpenCompass config
# ---------------------------------------------------------------------------------------------
CONFIG_HEAD = '''\
# OpenCompass config written by tunepipe's eval stage (stages/eval.py); do not edit, rerun the stage.
# Rerun it by hand from anywhere (results go to ./outputs/{run_name}/<timestamp>/):
#     .venvs/opencompass/bin/opencompass {config_path}
# Paths are relative to this file: mmengine fills in {{{{ fileDirname }}}} when it loads it.
# Types are named by import path and the file has no import statement, which keeps mmengine's
# plain config mode: in its lazy-import mode neither {{{{ fileDirname }}}} nor the shim below would
# take effect.

# Compatibility (transformers >= 5): PreTrainedTokenizerBase.batch_encode_plus was removed, and
# opencompass 0.5.4's HuggingFacewithChatTemplate.generate still calls it. Calling the tokenizer on
# a list is the same operation. Loading this config applies it, and the runners below run their
# tasks in this process (debug=True), so it reaches them. Drop it once opencompass stops calling it.
_tokenizer_base = __import__('transformers').PreTrainedTokenizerBase  # (an import statement would
if not hasattr(_tokenizer_base, 'batch_encode_plus'):                 # switch mmengine to lazy mode)
    _tokenizer_base.batch_encode_plus = _tokenizer_base.__call__
del _tokenizer_base

work_dir = 'outputs/{run_name}'

# Chat models keep the system turn as a system message (OpenCompass's default maps it to the user
# turn), so the prompt is the model's chat template over the conversation exactly as trained.
_chat_meta_template = {meta_template!r}
'''

CONFIG_BODY = '''
datasets = [
    dict(
        abbr={dataset!r},
        type='opencompass.datasets.CustomDataset',
        path='{{{{ fileDirname }}}}/data/{dataset}.jsonl',
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
        eval_cfg=dict(evaluator=dict(type='opencompass.openicl.icl_evaluator.RougeEvaluator')),
    ),
]

models = [{models}
]

# Tasks run one after another in this process (one model at a time, on the device its entry names:
# run_cfg num_gpus and model_kwargs device_map), deterministically, and the shim above applies.
infer = dict(
    partitioner=dict(type='opencompass.partitioners.NaivePartitioner'),
    runner=dict(type='opencompass.runners.LocalRunner', max_num_workers=1, debug=True,
                task=dict(type='opencompass.tasks.OpenICLInferTask')),
)
eval = dict(
    partitioner=dict(type='opencompass.partitioners.NaivePartitioner'),
    runner=dict(type='opencompass.runners.LocalRunner', max_num_workers=1, debug=True,
                task=dict(type='opencompass.tasks.OpenICLEvalTask')),
)
'''

MODEL_ENTRY = '''
    dict(
        type='opencompass.models.HuggingFacewithChatTemplate',
        abbr={abbr!r},
        path={path},
        tokenizer_path={tokenizer_path},
        model_kwargs={model_kwargs},
        tokenizer_kwargs={tokenizer_kwargs},
        generation_kwargs=dict(do_sample=False, num_beams=1),  # greedy
        meta_template=_chat_meta_template,
        stop_words={stop!r},
        pad_token_id={pad_token_id!r},
        max_seq_len={max_seq_len},
        max_out_len={max_new_tokens},
        batch_size={batch_size},
        run_cfg={run_cfg},
    ),'''


def config_path_expr(path: str, config_dir: Path) -> str:
    """A local folder next to the output folder (in the repo) relative to the config file, so the
    written config travels with the repo; a hub id or a folder elsewhere (the HF cache) as is."""
    local = Path(path).resolve()
    if Path(path).exists() and config_dir.resolve().parent in local.parents:
        return repr("{{ fileDirname }}/" + Path(os.path.relpath(local, config_dir.resolve())).as_posix())
    return repr(str(local) if Path(path).exists() else path)


def hf_run_settings(device: str, dtype: str) -> dict:
    """What an OpenCompass HuggingFace model entry needs to run on `device` (as pick_device returns
    it) in eval.dtype `dtype`: a GPU for the task and the model on it, or the CPU."""
    gpu = device.startswith("cuda")
    return {"model_kwargs": {"device_map": device, "torch_dtype": pick_dtype(dtype, device)},
            "run_cfg": {"num_gpus": 1 if gpu else 0}}


def write_config(path: Path, final_dir: Path, p: EvalParams, models: list[dict], device: str,
                 stop_words: list[str], pad_token_id: int | None = None) -> None:
    """`path` is where the config is written now (a temporary sibling of `final_dir`); the models
    run on `device` (see hf_run_settings); a model's own "dtype" overrides eval.dtype."""
    entries = []
    for m in models:
        settings = hf_run_settings(device, m.get("dtype") or p.dtype)
        model_kwargs = dict(settings["model_kwargs"])
        tokenizer_kwargs = {}
        if m.get("revision"):
            model_kwargs["revision"] = tokenizer_kwargs["revision"] = m["revision"]
        if m.get("trust_remote_code"):
            model_kwargs["trust_remote_code"] = tokenizer_kwargs["trust_remote_code"] = True
        entries.append(MODEL_ENTRY.format(
            abbr=m["abbr"], path=config_path_expr(m["path"], path.parent), model_kwargs=model_kwargs,
            tokenizer_path=config_path_expr(m.get("tokenizer_path", m["path"]), path.parent),
            tokenizer_kwargs=tokenizer_kwargs, stop=stop_words, pad_token_id=pad_token_id, max_seq_len=p.max_seq_len,
            max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, run_cfg=settings["run_cfg"]))
    text = CONFIG_HEAD.format(run_name=RUN_NAME, config_path=(final_dir / CONFIG_NAME).as_posix(),
                              meta_template=CHAT_META_TEMPLATE)
    text += CONFIG_BODY.format(dataset=p.dataset, max_new_tokens=p.max_new_tokens, models="".join(entries))
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# 4. run OpenCompass and read its results
# ---------------------------------------------------------------------------------------------
def run_opencompass(config: Path, cwd: Path) -> Path:
    """`opencompass <config>` in a subprocess of this env; returns outputs/<name>/<timestamp>/."""
    env = dict(os.environ)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(k, "1")  # everything is local: models from disk, metrics from opencompass
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "opencompass.cli.main", config.name]
    print(f"eval: running {' '.join(cmd)} (in {cwd})", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    runs = sorted((cwd / "outputs" / RUN_NAME).glob("*/"))
    if proc.returncode != 0 or len(runs) != 1:
        raise StageError(f"opencompass exited {proc.returncode} on {config.name}; its output is above")
    # scratch left behind: the runner's tmp/ (params of finished tasks), ChatInferencer's default
    # ./icl_inference_output/ (unused) and its tmp_<dataset>.json checkpoints (it deletes a .jsonl name)
    for scratch in ("tmp", "icl_inference_output"):
        if (cwd / scratch).is_dir() and not any((cwd / scratch).iterdir()):
            (cwd / scratch).rmdir()
    for tmp_pred in runs[0].glob("predictions/*/tmp_*.json"):
        if tmp_pred.with_name(tmp_pred.name[len("tmp_"):]).exists():
            tmp_pred.unlink()
    return runs[0]


def read_summary(run_dir: Path, dataset: str, abbrs: list[str]) -> dict:
    """summary_<timestamp>.csv (dataset,version,metric,mode,<model abbr>...) -> {model: {metric: score}}."""
    files = sorted((run_dir / "summary").glob("summary_*.csv"))
    if len(files) != 1:
        raise StageError(f"{run_dir}/summary: expected one summary_*.csv, found {len(files)}")
    scores: dict = {a: {} for a in abbrs}
    with open(files[0], encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["dataset"] != dataset:
                continue
            for a in abbrs:
                try:
                    scores[a][row["metric"]] = float(row[a])
                except (KeyError, ValueError):
                    raise StageError(f"{files[0]}: no score for model {a}, metric {row['metric']} "
                                     f"(got {row.get(a)!r}); see opencompass's output above") from None
    missing = [a for a in abbrs if not scores[a]]
    if missing:
        raise StageError(f"{files[0]}: no {dataset} rows for {missing}; see opencompass's output above")
    return scores


def read_predictions(run_dir: Path, dataset: str, abbrs: list[str], rows: list[dict]) -> list[dict]:
    out = []
    for a in abbrs:
        path = run_dir / "predictions" / a / f"{dataset}.json"
        preds = json.loads(path.read_text(encoding="utf-8"))
        if len(preds) != len(rows):
            raise StageError(f"{path}: {len(preds)} predictions for {len(rows)} test rows")
        for i, row in enumerate(rows):
            pred = preds[str(i)]
            out.append({"model": a, "id": row["id"], "prompt": row["messages"][:-1],
                        "prediction": pred["prediction"], "reference": row["answer"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--merged", default="models/merged")
    ap.add_argument("--turbomind", default="models/turbomind")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--out", default="eval")
    ap.add_argument("--metrics", default="metrics/eval.json")
    args = ap.parse_args()
    p = load_params("eval", EvalParams)
    if not p.models:
        raise StageError("params.yaml: eval.models is empty")

    rows = eval_rows(Path(args.test), p.max_samples)
    device = pick_device(p.device)
    final_dir = Path(args.out)
    with atomic_path(final_dir, is_dir=True) as tmp:
        tmp = tmp.resolve()
        write_jsonl(tmp / "data" / f"{p.dataset}.jsonl",
                    [{"id": r["id"], "messages": r["messages"], "answer": r["answer"]} for r in rows])

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
        # The config names local folders relative to itself. It is written in the temporary
        # sibling of eval/, so the same relative paths hold once it is renamed into place.
        write_config(tmp / CONFIG_NAME, final_dir, p, models, device, *stop_words(args.base))
        abbrs = [m["abbr"] for m in models]
        run_dir = run_opencompass(tmp / CONFIG_NAME, cwd=tmp)
        scores = read_summary(run_dir, p.dataset, abbrs)
        write_jsonl(tmp / "predictions.jsonl", read_predictions(run_dir, p.dataset, abbrs, rows))
        write_json(tmp / "summary.json", {
            "dataset": p.dataset, "test_rows": len(rows), "models": abbrs, "scores": scores,
            "opencompass_run": run_dir.relative_to(tmp).as_posix(), "notes": notes, "device": device,
            "batch_size": p.batch_size})

    write_json(args.metrics, {p.dataset: scores})
    for a in abbrs:
        print(f"eval: {p.dataset} {a}: " + ", ".join(f"{k}={v:.2f}" for k, v in scores[a].items()))


if __name__ == "__main__":
    run_stage(main)
