"""train, xtuner backend: LoRA SFT of the base model with xtuner 0.2, in .venvs/xtuner.

    .venvs/xtuner/bin/python -m stages.train_xtuner --train data/split/train.jsonl \
        --val data/split/val.jsonl --base models/base --out models/adapter \
        --work-dir models/checkpoints/xtuner --metrics metrics/train.json \
        --loss-plot plots/train_loss.csv

Reads the `train` section of params.yaml (stages.train.TrainParams), writes an ordinary xtuner
config from it to <work-dir>/inputs/xtuner_config.py, and runs xtuner's own tools on it in this process
(`xtuner.tools.train`, then `xtuner.tools.model_converters.pth_to_hf`). Not the `xtuner` CLI: it
re-launches `python` in a subprocess (so the shims in stages/shims.py would not reach it) and
exits 0 when the command fails. To rerun a generated config by hand, from the repo root:

    .venvs/xtuner/bin/python -m stages.shims xtuner.tools.train \
        models/checkpoints/xtuner/inputs/xtuner_config.py --work-dir models/checkpoints/xtuner

What xtuner sees, per conversation: token ids and labels made by the pipeline itself with the base
model's chat template (stages/chat_template.py, the hf backend's tokenization), written to
<work-dir>/inputs/train.jsonl; the config has xtuner's process_hf_dataset take them as they are
(no map function, no xtuner prompt template, no second tokenization): the loss is on the assistant
turns and their end-of-turn token, for every model family the pipeline supports. Tool-calling
conversations too: the tools offered, the calls (trained) and the tool results (not trained) are
rendered by the template as in the hf backend (stages/chat_template.py, `render_chat`).

How params map onto xtuner:
- batch_size: conversations per optimizer step on one process (xtuner `batch_size`, no gradient
  accumulation); with pack=true xtuner batches packed rows of max_length tokens, so it gets the
  number of rows that holds batch_size conversations of the mean length (at least 1).
- pack: xtuner's `pack_to_max_length` with `use_varlen_attn` (packed conversations isolated) where
  flash-attn is importable on a GPU; elsewhere pack is turned off with a warning
  (stages/xtuner_config.py, which also maps quantize nf4 to QLoRA and deepspeed zero2 to
  xtuner's `--deepspeed deepspeed_zero2`).
- warmup_ratio: linear warmup over round(ratio * total steps) steps (none when that is 0), then
  cosine decay to 0, so tiny data cannot produce an empty warmup ("end should be larger than
  begin").
- dtype: bfloat16 loads the base in bf16; xtuner's LoRA path (peft's prepare_model_for_kbit_
  training) upcasts weights to fp32, and bf16 autocast (AmpOptimWrapper) exists only on a GPU.
- gradient_checkpointing: SupervisedFinetune's `use_activation_checkpointing`.
- seed: `randomness.seed` and the sampler's seed.
- attn_implementation: sdpa or eager, passed to from_pretrained. The hf backend's other speed
  options (step_tokens, pack_tokens other than max_length, loss_chunk_size, compile,
  attn_implementation flex_attention/varlen) are refused with an error, not ignored.

Outputs, the same files and metric names as the hf backend (stages/train.py): the adapter in
PEFT format (adapter_config.json + adapter_model.safetensors, fp32), loaded by
`PeftModel.from_pretrained(base, out)` in any env; the loss curve (step,epoch,loss per step, from
xtuner's vis_data/scalars.json); metrics: train_loss_final, val_loss_before/after (base, and base
+ adapter, on --val), steps, train_tokens, tokens_per_s and runtime_s (over xtuner's iterations),
runtime_total_s (all of xtuner.tools.train: model load, data prep, checkpoints), peak_memory_mb,
trainable_params. Xtuner's checkpoints, logs and config dump stay in the work dir.

Resume: mmengine's CheckpointHook saves every train.save_every steps (else once an epoch). With
train.resume auto, a rerun whose params and data match <work-dir>/inputs/fingerprint.json
(stages/checkpoints.py) and whose last_checkpoint is before the last step keeps the work dir and
sets the config's `resume = True`: mmengine reloads the weights, optimizer, schedulers and
iteration and skips the batches already trained. Otherwise the earlier run's files are removed
and training starts from scratch (saying why, when there was a checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import runpy
import shutil
import sys
import time
from pathlib import Path

from stages import checkpoints, shims
from stages.chat_template import TemplateError, stop_token_ids, tokenize_conversation
from stages.common import (StageError, atomic_path, load_base_tokenizer, load_params, read_jsonl, resolve_base,
                           run_stage, write_json)
from stages.distributed import process_count
from stages.train import TrainParams, peak_memory_mb, write_loss_curve
from stages.xtuner_config import (CONFIG_NAME, check_quantize, deepspeed_config, render_config, resolve_packing,
                                  single_process_env, train_args)

# The generated config and xtuner's data live in <work-dir>/inputs/: mmengine's Runner dumps its
# resolved copy of the config to <work-dir>/<config name>, which must not overwrite ours.
INPUTS = "inputs"
FINGERPRINT = "fingerprint.json"  # what the run in the work dir is made from (stages/checkpoints.py)
LOG_DIR = re.compile(r"\d{8}_\d{6}")  # mmengine's per-launch log folder
ROLES = {"system", "user", "assistant", "tool"}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def load_conversations(path: Path) -> list[dict]:
    """{"messages", "tools"} of each canonical record, checked. Tool calls (an assistant's
    "tool_calls") and tool results (role "tool") are kept: encode renders them, and the tools
    offered, with the base model's chat template as the hf backend does."""
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    try:
        records = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    conversations = []
    for line, rec in enumerate(records, start=1):
        where = f"{path}: record {line} (id {rec.get('id', '?')})"
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(messages, list) or not messages:
            raise StageError(f"{where}: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise StageError(
                    f"{where}: messages[{i}] must be {{role: system|user|assistant|tool, content: str}}, "
                    f"got {json.dumps(m, ensure_ascii=False)[:120]}"
                )
            clean.append({k: m[k] for k in ("role", "content", "tool_calls") if k in m})
        if not any(m["role"] == "assistant" for m in clean):
            raise StageError(f"{where}: no assistant message, nothing to train on")
        conversations.append({"messages": clean, "tools": rec.get("tools")})
    return conversations


def write_tokenized_jsonl(path: Path, encoded: list[dict]) -> None:
    """xtuner's input: one {"input_ids", "labels"} per line, tokenized by the pipeline with the base
    model's chat template (stages/chat_template.py), so xtuner trains on exactly what the hf backend
    would; the config tells process_hf_dataset not to map, template or tokenize again."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for e in encoded:
            f.write(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"]}) + "\n")


def encode(conversations: list[dict], tokenizer, max_length: int, source: Path | None = None) -> list[dict]:
    """Token ids and labels of each conversation with the base model's chat template (the hf
    backend's own tokenization); conversations with no answer token within max_length are dropped."""
    try:
        stop_id = stop_token_ids(tokenizer)[0]
    except TemplateError as e:
        raise StageError(f"base tokenizer: {e}") from None
    out = []
    for n, conversation in enumerate(conversations, start=1):
        try:
            enc = tokenize_conversation(tokenizer, conversation["messages"], max_length, stop_id, conversation["tools"])
        except TemplateError as e:
            raise StageError(f"{source or 'conversations'}: record {n}: {e}") from None
        if any(label >= 0 for label in enc["labels"]):
            out.append(enc)
    return out


# ----------------------------------------------------------------------------------------------
# schedule and config
# ----------------------------------------------------------------------------------------------
def unsupported_options(p: TrainParams) -> list[str]:
    """hf-backend options (stages/train.py) that this backend cannot honour, set to non-default
    values: refused rather than silently ignored."""
    allowed = {"step_tokens": (None,), "loss_chunk_size": (0,), "compile": (False,),
               "attn_implementation": ("sdpa", "eager"), "pack_tokens": (None, p.max_length)}
    return [f"train.{name}={getattr(p, name)!r}" for name, ok in allowed.items()
            if hasattr(p, name) and getattr(p, name) not in ok]


def packed_rows(lengths: list[int], row_length: int, map_batch: int = 1000) -> tuple[int, int]:
    """(rows, tokens kept) of xtuner's Packer (xtuner/dataset/utils.py), which `datasets.map`
    calls on batches of 1000 conversations: it cuts the running concatenation into rows of
    row_length, carries the remainder to the next batch, emits a batch whose whole concatenation
    is shorter than a row as one short row, and drops the remainder left after the last batch.
    (xtuner shuffles before packing, which can move the rare short rows; the count here is for
    the file order.)"""
    rows, kept, residual = 0, 0, 0
    for start in range(0, len(lengths), map_batch):
        total = residual + sum(lengths[start:start + map_batch])
        if total >= row_length:
            rows += total // row_length
            kept += total // row_length * row_length
            residual = total % row_length
        else:
            rows, kept, residual = rows + 1, kept + total, 0
    return rows, kept


def plan_steps(p: TrainParams, encoded: list[dict], nproc: int = 1) -> dict:
    """Rows and tokens per epoch, steps and warmup, as xtuner will run them on nproc processes,
    each taking batch_rows of a step (the global step stays what one process would take)."""
    lengths = [len(e["input_ids"]) for e in encoded]
    tokens = sum(lengths)
    if p.pack:
        # train.batch_size counts conversations per step; xtuner's counts packed rows: take the
        # number of rows that holds batch_size conversations of the mean length
        batch_rows = max(1, round(p.batch_size * tokens / len(encoded) / p.max_length))
        rows, tokens = packed_rows(lengths, p.max_length)
    else:
        rows, batch_rows = len(encoded), p.batch_size
    batch_rows = max(1, round(batch_rows / nproc))
    steps_per_epoch = max(1, math.ceil(rows / (batch_rows * nproc)))
    total = steps_per_epoch * p.epochs
    warmup = min(round(p.warmup_ratio * total), total - 1)
    return {"rows_per_epoch": rows, "batch_rows": batch_rows, "tokens_per_epoch": tokens,
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "warmup_steps": warmup}


# ----------------------------------------------------------------------------------------------
# running xtuner's tools
# ----------------------------------------------------------------------------------------------
def resumable(work: Path, made_from: dict, mode: str, total_steps: int) -> tuple[bool, str]:
    """(whether xtuner can continue the run in work from its last_checkpoint, with mmengine's own
    resume; a one-line reason when there is a checkpoint it cannot continue from). A checkpoint
    at the last step is a finished run's: a rerun trains afresh."""
    pointer = work / "last_checkpoint"  # mmengine writes it once the .pth it names is complete
    checkpoint = work / Path(pointer.read_text(encoding="utf-8").strip()).name if pointer.is_file() else None
    if checkpoint is None or not checkpoint.exists():  # a .pth file, or a folder with train.deepspeed
        return False, ""
    if mode == "never":
        return False, f"train.resume is never: {checkpoint} ignored"
    reached = re.fullmatch(r"iter_(\d+)\.pth", checkpoint.name)
    if reached and int(reached.group(1)) >= total_steps:
        return False, ""
    try:
        why = checkpoints.mismatch(json.loads((work / INPUTS / FINGERPRINT).read_text(encoding="utf-8")), made_from)
    except (OSError, ValueError, KeyError) as e:
        why = f"{work / INPUTS / FINGERPRINT} unreadable ({e})"
    return why is None, why or ""


def clear_previous_run(work: Path) -> None:
    """A fresh run: remove what an earlier run left in the work dir (xtuner's checkpoints, log
    dirs, config dump, inputs), and only that."""
    work.mkdir(parents=True, exist_ok=True)
    for item in work.iterdir():
        if item.is_dir() and (item.name == INPUTS or LOG_DIR.fullmatch(item.name)
                              or re.fullmatch(r"iter_\d+\.pth|epoch_\d+\.pth", item.name)):  # DeepSpeed's are folders
            shutil.rmtree(item)
        elif item.is_file() and (re.fullmatch(r"iter_\d+\.pth|epoch_\d+\.pth", item.name)
                                 or item.name in ("last_checkpoint", CONFIG_NAME)):
            item.unlink()


def run_tool(module: str, args: list[str]) -> None:
    """Run one of xtuner's tool modules as `python -m module args` would, in this process."""
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # argparse errors and explicit exits
        if e.code not in (None, 0):
            raise StageError(f"{module} exited with {e.code}") from None
    finally:
        sys.argv = saved


def launch_command(nproc: int, config: Path, work: Path, deepspeed_json: Path | None) -> list[str]:
    """What `NPROC_PER_NODE=n xtuner train CONFIG [--deepspeed ...]` runs (xtuner's entry_point:
    torchrun on tools/train.py with --launcher pytorch), here as this python's
    torch.distributed.run on xtuner.tools.train through stages.shims, so that the shims reach every
    process and a failure is a non-zero exit (the xtuner CLI exits 0 when its command fails)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "stages.shims", "xtuner.tools.train", *train_args(config, work, deepspeed_json),
            "--launcher", "pytorch"]


def run_xtuner_train(nproc: int, config: Path, work: Path, deepspeed_json: Path | None) -> None:
    if nproc == 1:
        if deepspeed_json is not None and "RANK" not in os.environ:  # not under torchrun: a one-process group
            os.environ.update(single_process_env())
        run_tool("xtuner.tools.train", train_args(config, work, deepspeed_json))
        return
    import subprocess

    cmd = launch_command(nproc, config, work, deepspeed_json)
    print(f"[train_xtuner] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if subprocess.run(cmd, env=env).returncode:
        raise StageError(f"xtuner.tools.train on {nproc} processes failed; its log is above")


def read_scalars(log_dirs: list[Path]) -> list[tuple[int, float, float]]:
    """(step, loss, seconds) per iteration, from mmengine's LocalVisBackend, over the log dirs of
    a run and its resumptions, oldest first: a step logged again after a resume (it came after
    the checkpoint the killed run had reached) takes the later value."""
    points = {}
    for log_dir in log_dirs:
        path = log_dir / "vis_data" / "scalars.json"
        if not path.is_file():
            continue  # a run killed before its first logged step
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if "loss" in row:
                    # time: the whole iteration (data, forward, backward, step, hooks before it)
                    points[int(row["step"])] = (float(row["loss"]), float(row.get("time", 0.0)))
    if not points:
        raise StageError(f"{log_dirs[-1] / 'vis_data/scalars.json'}: no loss values (see xtuner's log there)")
    return [(step, loss, t) for step, (loss, t) in sorted(points.items())]


def mean_loss(model, encoded: list[dict]) -> float:
    """Token-weighted mean loss over the labelled tokens of the encoded conversations."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            labels = torch.tensor([e["labels"]], device=device)
            n = int((labels[:, 1:] >= 0).sum())
            if n:
                loss = model(input_ids=torch.tensor([e["input_ids"]], device=device), labels=labels).loss
                total += float(loss) * n
                count += n
    return total / count


def validation_losses(base: str, load: dict, adapter: Path, encoded: list[dict],
                      dtype: str) -> tuple[float, float]:
    """Validation loss of the base model, then of base + the trained adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, **load, dtype=getattr(torch, dtype)).to(device).eval()
    before = mean_loss(model, encoded)
    after = mean_loss(PeftModel.from_pretrained(model, str(adapter)).eval(), encoded)
    return before, after


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--loss-plot", type=Path, required=True)
    a = ap.parse_args(argv)

    p = load_params("train", TrainParams)
    unsupported = unsupported_options(p)
    if unsupported:
        raise StageError(f"params.yaml: {', '.join(unsupported)}: not supported by train.backend=xtuner "
                         "(hf backend only); set them back to their defaults or use train.backend=hf")
    if not (a.base / "manifest.json").is_file():
        raise StageError(f"{a.base}/manifest.json: not found (run the base stage first)")
    base, load = resolve_base(a.base)
    revision = load["revision"]
    train_convs = load_conversations(a.train)
    val_convs = load_conversations(a.val)
    if not train_convs:
        raise StageError(f"{a.train}: no records")

    applied = shims.apply("xtuner")
    print(f"[train_xtuner] shims applied: {', '.join(applied) or 'none'}", flush=True)
    import torch

    cuda = torch.cuda.is_available()
    check_quantize(p, cuda)
    p, use_varlen_attn, warning = resolve_packing(p, cuda)
    if warning:
        print(f"[train_xtuner] {warning}", flush=True)

    tokenizer = load_base_tokenizer(a.base)
    train_enc = encode(train_convs, tokenizer, p.max_length, a.train)
    if not train_enc:
        raise StageError(f"{a.train}: no conversation has an assistant token within max_length={p.max_length}")
    val_enc = encode(val_convs, tokenizer, p.max_length, a.val)
    if not val_enc:
        raise StageError(f"{a.val}: no conversation has an assistant token within max_length={p.max_length}")
    nproc = process_count(p.devices, p.sharding, p.device)
    plan = plan_steps(p, train_enc, nproc)
    use_amp = p.dtype == "bfloat16" and cuda
    if p.dtype == "bfloat16" and not use_amp:
        print("[train_xtuner] note: dtype=bfloat16 on CPU: xtuner's LoRA path upcasts to fp32 and "
              "bf16 autocast needs a GPU, so this trains in fp32 on bf16-rounded base weights", flush=True)

    # xtuner's inputs and config live in the work dir, so a user can read and rerun them
    work = a.work_dir
    made_from = checkpoints.fingerprint(p.model_dump(mode="json"), [a.train, a.val, a.base])
    resume, why_not = resumable(work, made_from, p.resume, plan["total_steps"])
    if why_not:
        print(f"[train_xtuner] resume: {why_not}; starting over", flush=True)
    if resume:
        print(f"[train_xtuner] resuming from {(work / 'last_checkpoint').read_text().strip()}", flush=True)
    else:
        clear_previous_run(work)
    write_json(work / INPUTS / FINGERPRINT, made_from)
    train_file = work / INPUTS / "train.jsonl"
    write_tokenized_jsonl(train_file, train_enc)
    config = work / INPUTS / CONFIG_NAME
    map_num_proc = 1 if len(train_convs) < 20000 else min(4, os.cpu_count() or 1)
    with atomic_path(config) as tmp:
        tmp.write_text(render_config(p, base=base, revision=revision, train_file=train_file, plan=plan,
                                     map_num_proc=map_num_proc, use_amp=use_amp,
                                     trust_remote_code=load["trust_remote_code"], resume=resume,
                                     use_varlen_attn=use_varlen_attn,
                                     dist_backend="nccl" if cuda and p.device != "cpu" else "gloo"), encoding="utf-8")
    print(f"[train_xtuner] config: {config}; plan: {json.dumps(plan)}", flush=True)

    # train: xtuner writes <work>/<timestamp>/ (logs, vis_data) and <work>/iter_N.pth
    t0 = time.perf_counter()
    deepspeed_json = None
    zero = p.deepspeed if p.deepspeed != "none" else p.sharding if p.sharding.startswith("zero") else None
    if zero:
        deepspeed_json = work / INPUTS / f"deepspeed_{zero}.json"
        write_json(deepspeed_json, deepspeed_config(p, cuda, zero))
    run_xtuner_train(nproc, config, work, deepspeed_json)
    total_time = time.perf_counter() - t0
    log_dirs = sorted(d for d in work.iterdir() if d.is_dir() and LOG_DIR.fullmatch(d.name))
    if not log_dirs or not (work / "last_checkpoint").is_file():
        raise StageError(f"{work}: xtuner finished without a log dir or last_checkpoint")
    checkpoint = Path((work / "last_checkpoint").read_text(encoding="utf-8").strip())
    losses = read_scalars(log_dirs)

    # convert: the .pth (LoRA weights + optimizer) -> PEFT adapter, safetensors, fp32
    with atomic_path(a.out, is_dir=True) as tmp_out:
        run_tool("xtuner.tools.model_converters.pth_to_hf",
                 [str(config), str(checkpoint), str(tmp_out), "--safe-serialization", "--fp32"])
        if not (tmp_out / "adapter_model.safetensors").is_file():
            raise StageError(f"pth_to_hf wrote no adapter_model.safetensors from {checkpoint}")
        val_before, val_after = validation_losses(base, load, tmp_out, val_enc, p.dtype)
        from safetensors import safe_open

        with safe_open(str(tmp_out / "adapter_model.safetensors"), "pt") as f:
            trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    # the same files and metric names as the hf backend (stages/train.py)
    steps = losses[-1][0]
    steps_per_epoch = max(1, steps // p.epochs)  # xtuner's TrainLoop: epochs * len(dataloader)
    write_loss_curve(str(a.loss_plot), [{"step": step, "epoch": math.ceil(step / steps_per_epoch), "loss": round(loss, 6)}
                                        for step, loss, _ in losses])

    runtime = sum(t for _, _, t in losses)
    tokens = plan["tokens_per_epoch"] * p.epochs
    metrics = {
        "train_loss_final": round(losses[-1][1], 6),
        "val_loss_before": round(val_before, 6),
        "val_loss_after": round(val_after, 6),
        "steps": steps,
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else 0.0,
        "runtime_s": round(runtime, 2),
        "runtime_total_s": round(total_time, 2),
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": trainable,
    }
    write_json(a.metrics, metrics)
    print(f"[train_xtuner] {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    run_stage(main)
