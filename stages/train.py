"""train: LoRA SFT of the base model on the train split; writes a PEFT adapter in HF format.

Two backends, chosen by train.backend:
  hf     - transformers + peft with the small loop below (this file)
  xtuner - xtuner 0.2's own config-driven trainer, run in .venvs/xtuner (stages/train_xtuner.py)
Loss is on assistant tokens only (each answer and its <|im_end|> stop token). With train.pack,
the conversations of a step are packed into rows with positions restarting per conversation;
transformers then masks attention per document, so the loss equals the unpacked (padded) one.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from stages.common import (IM_END, IM_START, Params, StageError, atomic_path, load_params, read_jsonl,
                           resolve_base, run_stage, write_json)


class LoraParams(Params):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainParams(Params):
    backend: Literal["hf", "xtuner"] = "hf"
    seed: int = 42
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 8            # conversations per optimizer step (before packing)
    max_length: int = 512          # tokens; longer conversations are truncated; also the packed row length
    pack: bool = True              # hf backend: pack samples into rows, isolated per document
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    lora: LoraParams = LoraParams()


IGNORE = -100


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids exactly as the chat template renders them; labels only on assistant answers."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        block = f"{IM_START}{m['role']}\n{m['content']}{IM_END}"
        start = text.index(block, cursor)
        if m["role"] == "assistant":
            content_start = start + len(f"{IM_START}assistant\n")
            spans.append((content_start, start + len(block)))
        cursor = start + len(block)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    labels = [tok if any(s <= a and b <= e for s, e in spans) else IGNORE
              for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"][:max_length], "labels": labels[:max_length]}


def collate(examples: list[dict], pack: bool, row_length: int, pad_id: int):
    """One step's batch. Packed: rows of concatenated samples, position_ids restarting at each
    sample and no attention mask (transformers derives per-document masking from the positions).
    Unpacked: padded to the longest sample, with an attention mask."""
    import torch

    if not pack:
        width = max(len(e["input_ids"]) for e in examples)
        pad = lambda seq, value: seq + [value] * (width - len(seq))
        return {"input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
                "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
                "labels": torch.tensor([pad(e["labels"], IGNORE) for e in examples])}
    rows: list[list[dict]] = [[]]
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):  # first-fit decreasing
        for row in rows:
            if sum(len(x["input_ids"]) for x in row) + len(e["input_ids"]) <= row_length:
                row.append(e)
                break
        else:
            rows.append([e])
    width = max(sum(len(x["input_ids"]) for x in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids = [t for x in row for t in x["input_ids"]]
        r_labels = [t for x in row for t in x["labels"]]
        r_pos = [i for x in row for i in range(len(x["input_ids"]))]
        fill = width - len(r_ids)
        # padding continues as one more "document" so it never attends into real samples
        ids.append(r_ids + [pad_id] * fill)
        labels.append(r_labels + [IGNORE] * fill)
        positions.append(r_pos + list(range(fill)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def batch_loss(model, batch) -> "torch.Tensor":
    """Mean cross-entropy over every labelled token of the step (same for packed and padded)."""
    return model(**batch, use_cache=False).loss


def load_examples(path: str, tokenizer, max_length: int) -> list[dict]:
    if not Path(path).exists():
        raise StageError(f"{path}: not found (run the split stage)")
    examples = [tokenize_conversation(tokenizer, r["messages"], max_length) for r in read_jsonl(path)]
    examples = [e for e in examples if any(t != IGNORE for t in e["labels"])]
    if not examples:
        raise StageError(f"{path}: no trainable conversations (no assistant turn within train.max_length)")
    return examples


def load_base_for_training(base_dir: str, dtype_name: str, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, revision = resolve_base(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype_name),
                                                 attn_implementation="sdpa").to(device)
    return tokenizer, model


def evaluate_loss(model, examples, p: TrainParams, pad_id: int, device) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), p.batch_size):
            chunk = examples[i:i + p.batch_size]
            n = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in chunk)
            batch = {k: v.to(device) for k, v in collate(chunk, p.pack, p.max_length, pad_id).items()}
            total += batch_loss(model, batch).item() * n
            count += n
    model.train()
    return total / count


def train_hf(p: TrainParams, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    random.seed(p.seed)
    torch.manual_seed(p.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load_base_for_training(args.base, p.dtype, device)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                             target_modules=p.lora.target_modules, task_type="CAUSAL_LM"))
    train = load_examples(args.train, tokenizer, p.max_length)
    val = load_examples(args.val, tokenizer, p.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    steps_per_epoch = math.ceil(len(train) / p.batch_size)
    total_steps = steps_per_epoch * p.epochs
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p.lr,
                                  weight_decay=p.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(p.warmup_ratio * total_steps), total_steps)

    rng = random.Random(p.seed)
    curve, tokens, step = [], 0, 0
    val_before = evaluate_loss(model, val, p, pad_id, device)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, desc=f"train (hf, {device.type})")
    for epoch in range(p.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), p.batch_size):
            chunk = [train[j] for j in order[i:i + p.batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk, p.pack, p.max_length, pad_id).items()}
            loss = batch_loss(model, batch)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(len(e["input_ids"]) for e in chunk)
            curve.append({"step": step, "epoch": epoch + 1, "loss": round(loss.item(), 6)})
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        model.save_pretrained(Path(args.checkpoints) / f"epoch-{epoch + 1}")  # persisted between runs
    bar.close()
    runtime = time.perf_counter() - started
    val_after = evaluate_loss(model, val, p, pad_id, device)

    with atomic_path(args.out, is_dir=True) as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    write_loss_curve(args.loss_plot, curve)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {"train_loss_final": curve[-1]["loss"], "val_loss_before": round(val_before, 6),
            "val_loss_after": round(val_after, 6), "steps": step, "train_tokens": tokens,
            "tokens_per_s": round(tokens / runtime, 1), "runtime_s": round(runtime, 2),
            "peak_memory_mb": round(peak / 2**20, 1),
            "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad)}


def write_loss_curve(path: str, curve: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss"])
        writer.writeheader()
        writer.writerows(curve)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--out", default="models/adapter")
    ap.add_argument("--checkpoints", default="models/checkpoints")
    ap.add_argument("--metrics", default="metrics/train.json")
    ap.add_argument("--loss-plot", default="plots/train_loss.csv")
    args = ap.parse_args()
    p = load_params("train", TrainParams)

    if p.backend == "xtuner":
        python = Path(".venvs/xtuner/bin/python")
        if not python.exists():
            raise StageError(f"{python}: missing; run TUNEPIPE_ENVS=xtuner ./setup.sh (train.backend is xtuner)")
        cmd = [str(python), "-m", "stages.train_xtuner", "--train", args.train, "--val", args.val, "--base", args.base,
               "--out", args.out, "--work-dir", str(Path(args.checkpoints) / "xtuner"), "--metrics", args.metrics,
               "--loss-plot", args.loss_plot]
        sys.exit(subprocess.run(cmd).returncode)

    metrics = train_hf(p, args)
    write_json(args.metrics, metrics)
    print(f"train: {metrics}")


if __name__ == "__main__":
    run_stage(main)
