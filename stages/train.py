"""train: LoRA SFT of the base model on the train split; writes a PEFT adapter in HF format.

Two backends, chosen by train.backend:
  hf     - transformers + peft with the small loop below (this file)
  xtuner - xtuner 0.2's own config-driven trainer, run in .venvs/xtuner (stages/train_xtuner.py)
The hf loop's parts: steps and batches (stages/train_batches.py), the loss and optimizer step
(stages/train_step.py), the varlen attention (stages/varlen_attention.py).
Loss is on assistant tokens only: each answer and the end-of-turn token after it, found from the
base model's own chat template (stages/chat_template.py). With train.pack,
the conversations of a step are packed into rows with positions restarting per conversation;
attention is masked per document, so the loss equals the unpacked (padded) one.
With train.devices > 1 and a train.sharding (ddp, fsdp2, zero2, zero3) the stage starts itself
again under torchrun, each process training its share of every step (stages/distributed.py).
Every train.save_every steps a checkpoint (adapter, optimizer, scheduler, RNG states, step) goes
to <checkpoints>/hf/; with train.resume auto a rerun continues from it (stages/checkpoints.py).

Speed options of the hf backend (defaults keep the plain, exact CPU path; benchmarks/ measures them):
  attn_implementation=varlen  FlashAttention-2's variable-length kernel that ships inside torch
                              (CUDA, bf16): packed documents isolated without any mask
  loss_chunk_size             cross-entropy from the hidden states a chunk at a time, so the
                              (tokens x vocab) fp32 logits never exist whole
  compile                     torch.compile of each decoder layer (norms, RoPE, SwiGLU, LoRA fused)
  step_tokens / pack_tokens   token-budget steps packed into long rows; step_tokens auto measures
                              the GPU and takes the largest budget that fits (stages/fit_memory.py)
  gradient_checkpointing      recompute each decoder layer in the backward pass (non-reentrant
                              torch checkpointing): less activation memory, ~1/3 more compute
  dtype=bfloat16              bf16 base; LoRA weights stay fp32 and run under bf16 autocast
  quantize=nf4                QLoRA: 4-bit base through bitsandbytes (CUDA)
On one H100, bf16 + varlen + loss_chunk_size=4096 + compile + step_tokens=pack_tokens=16384 train a
1.9B Llama with LoRA r=64 at about 51k tokens/s (benchmarks/README.md); the first steps compile
(about 100 s). attn_implementation=flex_attention (transformers' own) is exact too, but its
compilation did not finish within 5 minutes there.
"""
from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stages.chat_template import IGNORE, TemplateError, stop_token_ids, tokenize_conversation
from stages import distributed
from stages.common import (Params, StageError, atomic_path, load_base_tokenizer, load_params, pick_device, read_jsonl,
                           resolve_base, run_stage, write_json)
from stages.train_batches import make_batch, plan_steps
from stages.train_step import batch_loss, evaluate_loss, make_optimizer, resolve_step_tokens, train_step
from stages.varlen_attention import VARLEN, register_varlen_attention


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
    step_tokens: int | Literal["auto"] | None = None  # hf: token-budget steps instead: conversations until
    # this many tokens; auto: the largest budget that fits the GPU (stages/fit_memory.py; CPU: batch_size)
    step_tokens_memory: float = Field(0.9, gt=0, le=1)  # step_tokens auto: share of the GPU memory a step may use
    max_length: int = 512          # tokens; longer conversations are truncated
    pack: bool = True              # hf backend: pack samples into rows, isolated per document
    pack_tokens: int | None = None  # hf: packed row length (None: max_length)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantize: Literal["none", "nf4"] = "none"  # hf: nf4 = QLoRA, 4-bit base through bitsandbytes (CUDA)
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "varlen"] = "sdpa"
    loss_chunk_size: int = 0       # hf: >0: loss from hidden states this many tokens at a time
    compile: bool = False          # hf: torch.compile each decoder layer
    gradient_checkpointing: bool = False
    deepspeed: Literal["none", "zero2"] = "none"  # xtuner: ZeRO-2 through xtuner's own --deepspeed
    save_every: int = Field(50, ge=0)  # steps between resumable checkpoints (stages/checkpoints.py); 0: none
    resume: Literal["auto", "never"] = "auto"  # auto: a rerun continues from the last matching checkpoint
    lora: LoraParams = LoraParams()
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a CUDA GPU when one is visible
    devices: int | Literal["auto"] = Field(1, union_mode="left_to_right")  # processes; auto: every visible GPU
    sharding: Literal["none", "ddp", "fsdp2", "zero2", "zero3"] = "none"  # how several processes split the work

    @model_validator(mode="after")
    def _sharding_fits(self):
        several = self.devices == "auto" or self.devices > 1
        if self.devices != "auto" and self.devices < 1:
            raise ValueError("devices must be auto or at least 1")
        if self.sharding == "none" and self.devices != "auto" and self.devices > 1:
            raise ValueError(f"devices: {self.devices} needs a sharding (ddp, fsdp2, zero2 or zero3), not none")
        if self.backend == "xtuner" and self.sharding == "fsdp2":
            raise ValueError("sharding: fsdp2 is the hf backend's; xtuner runs ddp, zero2 or zero3")
        if several and self.sharding != "none" and self.backend == "hf":
            if self.step_tokens == "auto":
                raise ValueError("step_tokens: auto measures one device; with several set a number")
            if self.quantize == "nf4" and self.sharding != "ddp":
                raise ValueError(f"quantize: nf4 with sharding: {self.sharding}: 4-bit weights shard with ddp only")
            if self.sharding == "zero3" and self.loss_chunk_size:
                raise ValueError("sharding: zero3 gathers lm_head only in its forward, which the chunked loss "
                                 "skips: set loss_chunk_size 0 or use fsdp2")
        return self


def seeded_start(seed: int, base: str):
    """What the LoRA stages (train, cpt, dpo) start with: Python's and torch's RNGs seeded, the device
    (cuda when visible), the base model's tokenizer and the id batches are padded with."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_base_tokenizer(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return device, tokenizer, pad_id


def end_of_turn_id(tokenizer) -> int:
    """The chat template's end-of-turn token id (what answers are labelled through), or one line saying why not."""
    try:
        return stop_token_ids(tokenizer)[0]
    except TemplateError as e:
        raise StageError(f"base tokenizer: {e}") from None


def load_examples(path: str, tokenizer, max_length: int) -> list[dict]:
    if not Path(path).exists():
        raise StageError(f"{path}: not found (run the split stage)")
    stop_id = end_of_turn_id(tokenizer)
    examples = []
    for n, row in enumerate(read_jsonl(path), start=1):
        try:
            examples.append(tokenize_conversation(tokenizer, row["messages"], max_length, stop_id, row.get("tools")))
        except TemplateError as e:
            raise StageError(f"{path}: row {n} (id {row.get('id')}): {e}") from None
    examples = [e for e in examples if any(t != IGNORE for t in e["labels"])]
    if not examples:
        raise StageError(f"{path}: no trainable conversations (no assistant turn within train.max_length)")
    return examples


def build_model(path: str, load: dict, p: TrainParams, device):
    """The base model with fresh LoRA adapters, ready to train as p says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if p.pack_tokens and p.pack_tokens < p.max_length:
        raise StageError("train.pack_tokens must be at least train.max_length")
    if p.attn_implementation == "varlen":
        register_varlen_attention()
    dtype = getattr(torch, p.dtype)
    extra = {}
    if p.quantize == "nf4":
        from transformers import BitsAndBytesConfig

        extra = {"device_map": {"": device}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)}
    attn = VARLEN if p.attn_implementation == "varlen" else p.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **load, dtype=dtype, attn_implementation=attn, **extra)
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        raise StageError(f"{path}: train.attn_implementation={p.attn_implementation} is not supported by this "
                         f"architecture; try train.attn_implementation=eager ({str(e).splitlines()[0][:120]})") from None
    if p.quantize == "none":
        model = model.to(device)
    if p.gradient_checkpointing:
        # non-reentrant checkpointing: the LoRA weights inside a layer get gradients even though the
        # frozen layer's inputs need none; input grads on as well, for peft's reentrant expectations.
        # (transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                             target_modules=p.lora.target_modules, task_type="CAUSAL_LM"))
    if p.dtype == "bfloat16":
        # peft keeps LoRA weights in fp32 (good for AdamW) and would upcast each input to match;
        # under the bf16 autocast of batch_loss the adapters' matmuls run in bf16 instead
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if p.compile:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in model.get_base_model().get_decoder().layers:  # one graph, shared by all layers
            layer.compile(dynamic=True)
    return model


def optimizing(model, p: TrainParams, device, group, total_steps: int) -> tuple:
    """What steps the LoRA weights, with a cosine schedule over total_steps: in one process an AdamW
    optimizer and its scheduler; with group a distributed.Sharded model, which holds its own (and each
    rank's LoRA dropout is seeded apart). Returns optimizer, scheduler, sharded, loss_of (None: not used)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    schedule = lambda opt: get_cosine_schedule_with_warmup(opt, int(p.warmup_ratio * total_steps), total_steps)  # noqa: E731
    if group is None:
        optimizer = make_optimizer(model, p, device)
        return optimizer, schedule(optimizer), None, None
    sharded = distributed.Sharded(model, lambda m, batch: batch_loss(m, batch, p), group,
                                  lambda m: make_optimizer(m, p, device), schedule, p.dtype == "bfloat16")
    torch.manual_seed(p.seed + group.rank)  # LoRA dropout: each rank's own masks
    return None, None, sharded, sharded.loss


def resume_point(saved_at: Path, made_from: dict, p: TrainParams, total_steps: int, group) -> Path | None:
    """The checkpoint under saved_at this run continues from (stages/checkpoints.py), or None, saying why
    when one is there; runs of several processes make and resume none."""
    from stages import checkpoints

    resumable, why_not = None, None
    if group is None:
        resumable, why_not = checkpoints.find_resumable(saved_at, made_from, p.resume, total_steps)
    elif group.main and p.save_every:
        print(f"train: resumable checkpoints are made by one-process runs only; these {group.world} make none")
    if why_not:
        print(f"train: resume: {why_not}")
    return resumable


def train_hf(p: TrainParams, args, group=None) -> dict:
    """LoRA SFT as p says; with group (several processes under torchrun) this process trains its
    share of every step and only rank 0 writes the outs (the caller writes the metrics there)."""
    import torch
    from tqdm import tqdm

    from stages import checkpoints

    made_from = checkpoints.fingerprint(p.model_dump(mode="json"), [args.train, args.val, args.base])
    _, tokenizer, pad_id = seeded_start(p.seed, args.base)  # the same LoRA init on every rank
    device = group.device if group is not None else torch.device(pick_device(p.device))
    main_rank = group is None or group.main
    path, load = resolve_base(args.base)
    model = build_model(path, load, p, device)
    train = load_examples(args.train, tokenizer, p.max_length)
    val = load_examples(args.val, tokenizer, p.max_length)
    p, step_report = resolve_step_tokens(model, train, p, pad_id, device)

    rng = random.Random(p.seed)
    plan = [plan_steps(train, p, rng) for _ in range(p.epochs)]
    total_steps = sum(len(steps) for steps in plan)
    optimizer, scheduler, sharded, loss_of = optimizing(model, p, device, group, total_steps)

    # the run so far: a fresh one, or what the last matching checkpoint holds
    made_from = checkpoints.with_order(made_from, plan)
    saved_at = Path(args.checkpoints) / "hf"
    resumable = resume_point(saved_at, made_from, p, total_steps, group)
    if resumable:
        run = checkpoints.load(resumable, model, optimizer, scheduler)["run"]
        print(f"train: resuming from {resumable} (step {run['step']} of {total_steps})")
    else:
        run = {"step": 0, "curve": [], "tokens": 0, "runtime_s": 0.0,
               "val_before": evaluate_loss(model, val, p, pad_id, device, loss_of)}
    resumed_from = run["step"]
    started = time.perf_counter() - run["runtime_s"]
    model.train()
    where = device.type if group is None else f"{group.world} x {device.type}, {group.sharding}"
    bar = tqdm(total=total_steps, initial=run["step"], desc=f"train (hf, {where})", disable=not main_rank)
    step = 0
    for epoch, steps in enumerate(plan):
        for indices in steps:
            step += 1
            if step <= resumed_from:  # done before the checkpoint: its position in the data order
                continue
            if group is None:
                chunk = [train[j] for j in indices]
                loss = train_step(model, make_batch(chunk, p, pad_id, device), optimizer, p).item()
                scheduler.step()
            else:
                chunk, weight = distributed.local_step(indices, train, group)
                loss = distributed.mean_over_ranks(sharded.step(make_batch(chunk, p, pad_id, device), weight))
            run["tokens"] += sum(len(train[j]["input_ids"]) for j in indices)
            run["curve"].append({"step": step, "epoch": epoch + 1, "loss": round(loss, 6)})
            run["step"] = step
            bar.update()
            bar.set_postfix(loss=f"{run['curve'][-1]['loss']:.4f}")
            if group is None and p.save_every and step % p.save_every == 0:
                run["runtime_s"] = time.perf_counter() - started
                checkpoints.save(saved_at, step, model, optimizer, scheduler, run, made_from)
    bar.close()
    runtime = time.perf_counter() - started
    val_after = evaluate_loss(model, val, p, pad_id, device, loss_of)
    adapter_state = sharded.adapter_state() if sharded else None  # every rank: gathering is collective

    if main_rank:
        with atomic_path(args.out, is_dir=True) as out:
            save_adapter(model, out, adapter_state)
            tokenizer.save_pretrained(out)
        write_loss_curve(args.loss_plot, run["curve"])
    return {"train_loss_final": run["curve"][-1]["loss"], "val_loss_before": round(run["val_before"], 6),
            "val_loss_after": round(val_after, 6), "steps": run["step"], "train_tokens": run["tokens"],
            "tokens_per_s": round(run["tokens"] / runtime, 1), "runtime_s": round(runtime, 2),
            "peak_memory_mb": peak_memory_mb(), **step_report, "gradient_checkpointing": p.gradient_checkpointing,
            "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "resumed_from_step": resumed_from, "processes": group.world if group else 1, "sharding": p.sharding}


def save_adapter(model, folder, state_dict: dict | None = None) -> None:
    """save_pretrained (of state_dict, the whole LoRA weights, where the model's are sharded), with
    adapter_config.json's target_modules sorted: peft keeps them as a set, whose order changes
    with each process's hash seed, so identical training gave different files."""
    import json

    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    config_path = Path(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_loss_curve(path: str, curve: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss"])
        writer.writeheader()
        writer.writerows(curve)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or on a CPU the process's peak resident size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--base", default="models/sft_base")
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

    if p.deepspeed != "none":
        raise StageError(f"params.yaml: train.deepspeed={p.deepspeed} is for train.backend=xtuner in one process; "
                         "the hf backend takes train.sharding zero2|zero3 with train.devices")
    nproc = distributed.process_count(p.devices, p.sharding, p.device)
    if nproc > 1 and not distributed.launched():  # this same stage again, as nproc processes
        sys.exit(distributed.relaunch(nproc, "stages.train", sys.argv[1:]))
    group = None
    if distributed.launched():
        distributed.check_sharding(p.sharding)
        group = distributed.join(p.sharding, p.device)
    try:
        metrics = train_hf(p, args, group)
    finally:
        distributed.leave()
    if group is None or group.main:
        Path(args.checkpoints).mkdir(parents=True, exist_ok=True)  # a DVC out: there even when no step saved one
        write_json(args.metrics, metrics)
        print(f"train: {metrics}")


if __name__ == "__main__":
    run_stage(main)
