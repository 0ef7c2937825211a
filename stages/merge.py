"""merge: fold the LoRA adapter into the base weights; write a standalone HF model.

The merged folder carries safetensors weights (in shards of merge.max_shard_size), the base
tokenizer (with the chat template) and a generation config whose eos is the chat template's stop
token (its end-of-turn token, stages/chat_template.py), so any HF-compatible server stops where training taught the model to stop.

Device and dtype: merge.device auto merges on the GPU when there is one, and merge.dtype auto
loads, merges, checks and saves in bfloat16 there (float32 on a CPU). The metric checks the merge:
logits of base+adapter and of the merged model on validation conversations, computed on the same
device in the same dtype, must agree:
  float32         every logit within merge.max_abs_logit_diff (1e-3: only summation order differs).
  bfloat16/fp16   rounding noise is relative, not absolute: W + BA is rounded to 8 (fp16: 11)
                  significant bits and both forward passes round every activation, so logits of
                  size ~20 differ by ~0.1 whatever the merge did. The check is therefore relative to
                  what the adapter does: rel_logit_diff = rms(merged - adapter) / rms(adapter -
                  base), over the checked tokens (base = the same model with the adapter switched
                  off), must stay under merge.max_rel_logit_diff (0.1). A right merge leaves a few
                  percent (rounding); a lost, doubled or misplaced adapter gives ~1 or more. A LoRA
                  update smaller than half a bf16 step of the weight it is added to is rounded away:
                  that shows here too, and merge.dtype float32 is the remedy.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.chat_template import render_chat, stop_token_ids
from stages.common import (Params, StageError, atomic_path, load_base_tokenizer, load_params, pick_device, pick_dtype,
                           read_jsonl, resolve_base, run_stage, write_json)
from stages.remote_code import shipped_code


class MergeParams(Params):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # merged weights; auto: bf16 on cuda, fp32 on cpu
    max_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*[KMG]i?B$")  # safetensors shard size
    check_rows: int = 8             # validation conversations used for the logit check
    max_abs_logit_diff: float = 1e-3  # float32: fail when the merge moves any logit more than this
    max_rel_logit_diff: float = 0.1   # bf16/fp16: fail when rms(merged - adapter) / rms(adapter - base) exceeds this


def merge_settings(device: str, dtype: str) -> dict:
    """Where and in what the merge runs for a device (as pick_device returns it) and merge.dtype,
    and which tolerance its logit check applies (see the module docstring)."""
    dtype = pick_dtype(dtype, device)
    return {"device": device, "dtype": dtype,
            "check": "max_abs_logit_diff" if dtype == "float32" else "max_rel_logit_diff"}


def check_merge(max_abs: float, rel: float, settings: dict, p: MergeParams) -> None:
    """StageError when the adapter-vs-merged logits differ more than the dtype's tolerance allows."""
    if settings["check"] == "max_abs_logit_diff":
        if not max_abs <= p.max_abs_logit_diff:
            raise StageError(f"merge changed logits by {max_abs:.2e} > merge.max_abs_logit_diff {p.max_abs_logit_diff}")
    elif not rel <= p.max_rel_logit_diff:
        raise StageError(f"merge ({settings['dtype']}) changed logits by {rel:.3f} of the adapter's own change "
                         f"(rms) > merge.max_rel_logit_diff {p.max_rel_logit_diff}; if the adapter's updates are "
                         f"smaller than {settings['dtype']} rounding of the weights, set merge.dtype float32")


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "qwen.tiktoken"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/sft_base")
    ap.add_argument("--adapter", default="models/dpo_adapter")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--out", default="models/merged")
    ap.add_argument("--metrics", default="metrics/merge.json")
    args = ap.parse_args()
    p = load_params("merge", MergeParams)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    path, load = resolve_base(args.base)
    if not Path(args.adapter, "adapter_config.json").exists():
        raise StageError(f"{args.adapter}: no adapter_config.json (run the train stage)")
    settings = merge_settings(pick_device(p.device), p.dtype)
    device = torch.device(settings["device"])
    tokenizer = load_base_tokenizer(args.base)
    # loaded straight onto the device in the merge dtype; peft keeps the LoRA weights in fp32
    base = AutoModelForCausalLM.from_pretrained(path, **load, dtype=getattr(torch, settings["dtype"]),
                                                device_map=settings["device"])
    model = PeftModel.from_pretrained(base, args.adapter).eval()

    texts = [render_chat(tokenizer, r["messages"], r.get("tools")) for r in read_jsonl(args.val)[:p.check_rows]]
    # one conversation at a time (no padding): at most one row's fp32 logits besides the kept ones
    rows = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for t in texts]
    with torch.no_grad():
        with_adapter, change_sq = [], 0.0
        for ids in rows:
            with_adapter.append(model(ids).logits[0])
            with model.disable_adapter():
                change_sq += (with_adapter[-1].float() - model(ids).logits[0].float()).pow(2).sum().item()
        merged = model.merge_and_unload()
        diff, diff_sq = 0.0, 0.0
        for ids, logits in zip(rows, with_adapter):
            delta = merged(ids).logits[0].float() - logits.float()
            diff, diff_sq = max(diff, delta.abs().max().item()), diff_sq + delta.pow(2).sum().item()
    rel = math.sqrt(diff_sq / change_sq) if change_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    check_merge(diff, rel, settings, p)

    stop_ids = stop_token_ids(tokenizer)
    tokenizer_dir = Path(args.base) if (Path(args.base) / "tokenizer_config.json").exists() else Path(path)
    with atomic_path(args.out, is_dir=True) as out:
        merged.save_pretrained(out, safe_serialization=True, max_shard_size=p.max_shard_size)
        for name in TOKENIZER_FILES:  # the base's files as they are: same template, same specials
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, out / name)
        if not (out / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(out)
        for name in shipped_code(path):  # a remote-code base's own .py files (its tokenizer's too)
            shutil.copy2(Path(path) / name, out / name)
        GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False,
                         max_new_tokens=128).save_pretrained(out)
        shards = len(list(out.glob("*.safetensors")))
    write_json(args.metrics, {"max_abs_logit_diff": diff, "rel_logit_diff": rel if math.isfinite(rel) else None,
                              "check_rows": len(texts),
                              "check": settings["check"], "device": settings["device"], "dtype": settings["dtype"],
                              "shards": shards})
    print(f"merge: {args.adapter} + {path} -> {args.out} on {settings['device']} in {settings['dtype']}, "
          f"{shards} shard(s) (max |logit diff| {diff:.2e}, {rel:.2e} of the adapter's change)")


if __name__ == "__main__":
    run_stage(main)
