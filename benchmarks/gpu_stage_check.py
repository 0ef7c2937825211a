"""Every stage on the GPU (issue 11, part 4): what the stages choose on a real GPU, with their own code.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_stage_check.py --memory-gb 40 --out $OUT   # on the GPU
    .venvs/core/bin/python benchmarks/gpu_stage_check.py --cpu                          # here: no GPU

In a temporary folder:
  1. train   the train stage (stages.train) on a tiny demo model with train.step_tokens auto,
             bfloat16 and varlen attention on the GPU: the budget it chose, metrics/train.json.
  2. merge   the merge stage with merge.device/dtype auto (cuda, bfloat16 expected) on a LoRA
             adapter with non-zero B, shards of 1MB: the relative logit check and the shards.
  3. eval    the OpenCompass model entries eval writes for these models (num_gpus, device_map,
             torch_dtype, batch_size). OpenCompass and lmdeploy are not on the GPU machine: not run.
  4. turbomind  the device and dtype lmdeploy would be called with (float16 and bfloat16).
  5. fit     step_tokens auto on a random-init Qwen2-0.5B-shaped model (bf16, LoRA r=16 on 7
             projections, varlen, loss chunks of 4096, rows of 4096, samples of median 265 tokens),
             under torch.cuda.set_per_process_memory_fraction(--memory-gb): the budget, predicted and
             measured peaks, then three real steps of that plan and their peak; without and with
             train.gradient_checkpointing. With --cpu: a tiny model, and auto's CPU fallback.
Prints one JSON object (also <out>/gpu_stage_check.json); exit status 1 if a check failed.
Needs torch, transformers, peft, tokenizers, safetensors, pyyaml and pydantic (carry pydantic as
wheels to the GPU machine, as for benchmarks/train_throughput.py).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True)


@contextlib.contextmanager
def inside(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def deep_update(tree: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(tree.setdefault(key, {}), value)
        else:
            tree[key] = value
    return tree


def run_stage(folder: Path, name: str, changes: dict, *argv: str) -> None:
    """python -m stages.<name> in `folder`, with the repo's params.yaml plus `changes`."""
    import importlib

    import yaml

    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), changes)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    module = importlib.import_module(f"stages.{name}")
    saved = sys.argv
    sys.argv = [name, *argv]
    try:
        with inside(folder):
            module.main()
    finally:
        sys.argv = saved


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        drug, dose = f"drug{rng.randint(1, 40)}", rng.choice([5, 10, 25, 50, 100])
        messages = [{"role": "user", "content": f"How much {drug} should an adult take? ({i})"},
                    {"role": "assistant", "content": f"The usual adult dose of {drug} is {dose} mg once daily."}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "You are a careful pharmacist."})
        rows.append({"id": f"r{i}", "source": {"file": "check", "row": i}, "messages": messages, "meta": {}})
    return rows


def demo_folder(folder: Path) -> None:
    """models/base (the demo model, smaller) and data/split/{train,val}.jsonl, as the stages expect."""
    from stages.base import DemoModelParams, build_tiny_model, save_portable_tokenizer
    from stages.common import write_jsonl

    train, val = conversations(240, 0), conversations(16, 1)
    texts = [m["content"] for r in train for m in r["messages"]]
    model, tokenizer, _ = build_tiny_model(texts, DemoModelParams(vocab_size=600, num_layers=2, pretrain_steps=20,
                                                                  pretrain_batch=8), seed=0, progress=False)
    base = folder / "models/base"
    model.save_pretrained(base)
    save_portable_tokenizer(tokenizer, base)
    (base / "manifest.json").write_text(json.dumps({"source": "demo"}))
    write_jsonl(folder / "data/split/train.jsonl", train)
    write_jsonl(folder / "data/split/val.jsonl", val)


def check_train(folder: Path, cuda: bool) -> dict:
    run_stage(folder, "train", {"train": {
        "epochs": 1, "step_tokens": "auto", "dtype": "bfloat16" if cuda else "float32",
        "attn_implementation": "varlen" if cuda else "sdpa"}})
    metrics = json.loads((folder / "metrics/train.json").read_text())
    assert (metrics["step_tokens"] > 0) if cuda else (metrics["step_tokens"] is None), metrics
    return {k: metrics[k] for k in ("step_tokens", "step_tokens_auto", "steps", "train_tokens", "peak_memory_mb",
                                    "val_loss_before", "val_loss_after")}


def check_merge(folder: Path, cuda: bool) -> dict:
    """The merge stage on an adapter whose B is non-zero (a fresh one would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "models/base"), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.02)
    model.save_pretrained(folder / "models/adapter_check")
    run_stage(folder, "merge", {"merge": {"device": "auto", "dtype": "auto", "max_shard_size": "1MB"}},
              "--adapter", "models/adapter_check", "--out", "models/merged")
    metrics = json.loads((folder / "metrics/merge.json").read_text())
    want = ("cuda", "bfloat16", "max_rel_logit_diff") if cuda else ("cpu", "float32", "max_abs_logit_diff")
    assert (metrics["device"], metrics["dtype"], metrics["check"]) == want, metrics
    shards = sorted((folder / "models/merged").glob("*.safetensors"))
    weight_bytes = sum(f.stat().st_size for f in shards)
    # a tiny bf16 model can fit one 1MB shard; anything larger must be split and indexed
    assert metrics["shards"] == len(shards), metrics
    assert weight_bytes <= 1_000_000 or (len(shards) > 1 and (folder / "models/merged/model.safetensors.index.json")
                                         .exists()), (metrics, weight_bytes)
    loaded = AutoModelForCausalLM.from_pretrained(folder / "models/merged")
    metrics["reloaded_dtype"] = str(loaded.dtype)
    return metrics


def check_eval(folder: Path, cuda: bool) -> dict:
    import ast

    from stages.common import pick_device
    from stages.eval import EvalParams
    from stages.eval_config import write_config

    device = pick_device("auto")
    out = folder / "eval_check"
    out.mkdir()
    write_config(out / "opencompass_config.py", out, EvalParams(), [
        {"abbr": "base", "path": str(folder / "models/base")}, {"abbr": "merged", "path": str(folder / "models/merged")},
        {"abbr": "turbomind_w4a16_dequant", "path": str(folder / "models/merged"),
         "dtype": "float16" if device == "cuda" else None}], device, ["<|im_end|>"])
    text = (out / "opencompass_config.py").read_text()
    entries = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and any(k.arg == "run_cfg" for k in node.keywords):
            kw = {k.arg: k.value for k in node.keywords}
            entries.append({"abbr": ast.literal_eval(kw["abbr"]), "run_cfg": ast.literal_eval(kw["run_cfg"]),
                            "model_kwargs": ast.literal_eval(kw["model_kwargs"]),
                            "batch_size": ast.literal_eval(kw["batch_size"])})
    gpus = 1 if cuda else 0
    assert [e["run_cfg"]["num_gpus"] for e in entries] == [gpus] * 3, entries
    assert entries[0]["model_kwargs"]["device_map"] == device, entries
    return {"device": device, "entries": entries}


def check_turbomind(cuda: bool) -> dict:
    from stages.common import StageError, pick_device
    from stages.turbomind import turbomind_settings

    device = pick_device("auto")
    result = {"float16": turbomind_settings(device, "float16")}
    try:
        result["bfloat16"] = turbomind_settings(device, "bfloat16")
    except StageError as e:
        result["bfloat16"] = f"StageError: {e}"
    assert isinstance(result["bfloat16"], dict) == cuda, result
    return result


def check_fit(folder: Path, cuda: bool, memory_gb: float) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stages.train import LoraParams, TrainParams, build_model
    from stages.train_batches import make_batch, plan_steps
    from stages.train_step import make_optimizer, resolve_step_tokens, train_step

    device = torch.device("cuda" if cuda else "cpu")
    config = QWEN_05B if cuda else TINY
    path = folder / "fit_model"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**config)).to(torch.bfloat16 if cuda else torch.float32)
    n_params = sum(q.numel() for q in model.parameters())
    model.save_pretrained(path)
    del model
    g = torch.Generator().manual_seed(0)
    sigma = math.sqrt(2 * math.log(356 / 265))
    lengths = torch.exp(math.log(265) + sigma * torch.randn(3000, generator=g)).round().clamp(16, 2048).long()
    examples = []
    for n in lengths.tolist():
        ids = torch.randint(0, config["vocab_size"], (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    report = {"model_params": n_params, "train_tokens": int(lengths.sum()), "memory_gb_cap": memory_gb if cuda else None,
              "torch_has_get_per_process_memory_fraction": hasattr(torch.cuda, "get_per_process_memory_fraction")}
    for checkpointing in (False, True):
        p = TrainParams(step_tokens="auto", dtype="bfloat16" if cuda else "float32", max_length=2048,
                        pack_tokens=4096, attn_implementation="varlen" if cuda else "sdpa",
                        loss_chunk_size=4096 if cuda else 0, gradient_checkpointing=checkpointing, lr=2e-4,
                        lora=LoraParams(r=16, alpha=32, dropout=0.05))
        model = build_model(str(path), {"revision": None}, p, device)
        started = time.perf_counter()
        resolved, chosen = resolve_step_tokens(model, examples, p, 0, device)
        seconds = round(time.perf_counter() - started, 1)
        optimizer = make_optimizer(model, resolved, device)
        model.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        steps = plan_steps(examples, resolved, random.Random(resolved.seed))[:3]
        started = time.perf_counter()
        losses = [train_step(model, make_batch([examples[i] for i in s], resolved, 0, device), optimizer, resolved)
                  for s in steps]
        tokens = sum(len(examples[i]["input_ids"]) for s in steps for i in s)
        report["gradient_checkpointing" if checkpointing else "plain"] = {
            **chosen, "choose_s": seconds, "steps_run": len(steps), "step_tokens_run": tokens,
            "tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
            "losses": [round(x.item(), 4) for x in losses],
            "peak_of_steps_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None}
        del model, optimizer, losses
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="no GPU: run the same checks on the CPU")
    ap.add_argument("--memory-gb", type=float, default=40.0, help="per-process GPU memory cap for every check")
    ap.add_argument("--out", help="folder for gpu_stage_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "merge", "eval", "turbomind", "fit"])
    args = ap.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts CUDA
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("no GPU visible (torch.cuda.is_available() is False); run with --cpu to check on the CPU")
        sys.exit(2)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 2**30 / total))
        report["memory_cap_gib"] = round(min(total, args.memory_gb * 2**30) / 2**30, 1)
    else:
        print("no GPU: " + ("--cpu given, " if args.cpu else "") + "the checks run on the CPU (tiny sizes)")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["TUNEPIPE_PARAMS"] = str(folder / "params.yaml")  # read by stages.common on import
        demo_folder(folder)
        checks = {"train": lambda: check_train(folder, cuda), "merge": lambda: check_merge(folder, cuda),
                  "eval": lambda: check_eval(folder, cuda), "turbomind": lambda: check_turbomind(cuda),
                  "fit": lambda: check_fit(folder, cuda, args.memory_gb)}
        for name, check in checks.items():
            if name in args.skip:
                continue
            started = time.perf_counter()
            try:
                report[name] = check()
            except Exception as e:  # noqa: BLE001 - report it and go on: GPU time is scarce
                traceback.print_exc()
                report[name] = {"failed": f"{type(e).__name__}: {str(e)[:1000]}"}
                failed.append(name)
            report[name + "_s"] = round(time.perf_counter() - started, 1)
            print(f"[{name}] {json.dumps(report[name], default=str)}", flush=True)
    report["failed"] = failed
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_stage_check.json").write_text(text + "\n")
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
