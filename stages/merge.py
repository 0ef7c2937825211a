"""merge: fold the LoRA adapter into the base weights; write a standalone HF model.

The merged folder carries safetensors weights, the base tokenizer (with the chat template) and a
generation config whose eos is the chat template's end-of-turn token (stages/chat_template.py), so any HF-compatible server stops
where training taught the model to stop. The metric checks the merge: logits of base+adapter and
of the merged model on validation conversations must agree.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from stages.chat_template import stop_token_ids
from stages.common import (Params, StageError, atomic_path, load_base_tokenizer, load_params, read_jsonl, resolve_base,
                           run_stage, write_json)
from stages.remote_code import shipped_code


class MergeParams(Params):
    dtype: str = "float32"          # dtype of the merged weights: float32 | bfloat16 | float16
    check_rows: int = 8             # validation conversations used for the logit check
    max_abs_logit_diff: float = 1e-3  # fail the stage when the merge changes logits more than this


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "qwen.tiktoken"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapter", default="models/adapter")
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
    tokenizer = load_base_tokenizer(args.base)
    if tokenizer.pad_token is None:  # the logit check pads a batch (Llama-3 ships no pad token)
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(path, **load, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter).eval()

    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in read_jsonl(args.val)[:p.check_rows]]
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with_adapter = model(**batch).logits
        merged = model.merge_and_unload()
        after_merge = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (with_adapter - after_merge).abs()[mask].max().item()
    if diff > p.max_abs_logit_diff:
        raise StageError(f"merge changed logits by {diff:.2e} > merge.max_abs_logit_diff {p.max_abs_logit_diff}")

    stop_ids = stop_token_ids(tokenizer)
    tokenizer_dir = Path(args.base) if (Path(args.base) / "tokenizer_config.json").exists() else Path(path)
    with atomic_path(args.out, is_dir=True) as out:
        merged.to(getattr(torch, p.dtype)).save_pretrained(out, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the base's files as they are: same template, same specials
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, out / name)
        if not (out / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(out)
        for name in shipped_code(path):  # a remote-code base's own .py files (its tokenizer's too)
            shutil.copy2(Path(path) / name, out / name)
        GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False,
                         max_new_tokens=128).save_pretrained(out)
    write_json(args.metrics, {"max_abs_logit_diff": diff, "check_rows": len(texts)})
    print(f"merge: {args.adapter} + {path} -> {args.out} (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    run_stage(main)
