"""cpt: LoRA continued pre-training of the base model on the corpus, before SFT (off by default).

Always in the chain (base -> cpt -> train): it writes models/sft_base, the weights SFT starts from.
With cpt.enabled false that is a copy of models/base. With it on, a LoRA adapter is trained on
data/split/corpus.jsonl (the `text` records split sets aside) with train's own machinery
(stages/train.py: build_model; stages/train_batches.py: packed rows isolated per document;
stages/train_step.py: train_step), every token a target; the adapter is then merged into the base
weights, so models/sft_base is a plain model that train, dpo and merge load like any base (merged rather than stacked: one adapter per later stage,
and merge folds only the last one). Metrics: loss curve (plots/cpt_loss.csv), tokens/s (metrics/cpt.json).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from pydantic import Field

from stages.common import (Params, StageError, atomic_path, load_params, read_jsonl, resolve_base,
                           run_stage, write_json)
from stages.train import LoraParams, TrainParams, build_model, seeded_start, write_loss_curve
from stages.train_batches import make_batch, plan_steps
from stages.train_step import make_optimizer, train_step


class CptParams(Params):
    enabled: bool = False
    seed: int = 0
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)   # documents (chunks of max_length tokens) per step, packed
    max_length: int = 512              # longer documents are cut into chunks of this many tokens
    lora: LoraParams = LoraParams()


def load_documents(path: str, tokenizer, max_length: int) -> list[dict]:
    """Each corpus text as token ids ending in eos, cut into chunks of max_length; every token is a target."""
    if not Path(path).exists():
        raise StageError(f"{path}: not found (run the split stage)")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chunks = []
    for n, row in enumerate(read_jsonl(path), start=1):
        if not row.get("text"):
            raise StageError(f"{path}: row {n} (id {row.get('id')}): no `text`")
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
        chunks += [{"input_ids": ids[i:i + max_length], "labels": ids[i:i + max_length]}
                   for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    if not chunks:
        raise StageError(f"{path}: no corpus text to pre-train on (cpt.enabled is true)")
    return chunks


def run_cpt(p: CptParams, args) -> dict:
    device, tokenizer, pad_id = seeded_start(p.seed, args.base)
    docs = load_documents(args.corpus, tokenizer, p.max_length)
    # train's loop settings: packed rows of max_length, documents isolated, fp32 on this path
    tp = TrainParams(seed=p.seed, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, max_length=p.max_length,
                     pack=True, lora=p.lora)
    path, load = resolve_base(args.base)
    model = build_model(path, load, tp, device)
    optimizer = make_optimizer(model, tp, device)
    rng, curve, tokens, step = random.Random(p.seed), [], 0, 0
    model.train()
    started = time.perf_counter()
    for epoch in range(1, p.epochs + 1):
        for indices in plan_steps(docs, tp, rng):
            chunk = [docs[i] for i in indices]
            loss = train_step(model, make_batch(chunk, tp, pad_id, device), optimizer, tp)
            step += 1
            tokens += sum(len(d["input_ids"]) for d in chunk)
            curve.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 6)})
    runtime = time.perf_counter() - started

    merged = model.merge_and_unload()
    manifest = json.loads((Path(args.base) / "manifest.json").read_text(encoding="utf-8"))
    with atomic_path(args.out, is_dir=True) as out:
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        copy_code_files(path, out)
        # the weights are here now (resolve_base reads a converted model from its own folder)
        (out / "manifest.json").write_text(json.dumps({**manifest, "conversion": "cpt", "cpt_of": args.base},
                                                      indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_loss_curve(args.loss_plot, curve)
    return {"enabled": True, "documents": len(docs), "steps": step, "tokens": tokens,
            "loss_first": curve[0]["loss"], "loss_final": curve[-1]["loss"],
            "tokens_per_s": round(tokens / runtime, 1), "runtime_s": round(runtime, 2)}


def copy_code_files(model_path: str, out: Path) -> None:
    """A remote-code base ships Python files next to its weights: sft_base must carry them too."""
    folder = Path(model_path)
    if folder.is_dir():
        for code in folder.glob("*.py"):
            shutil.copy2(code, out / code.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/split/corpus.jsonl")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--out", default="models/sft_base")
    ap.add_argument("--metrics", default="metrics/cpt.json")
    ap.add_argument("--loss-plot", default="plots/cpt_loss.csv")
    args = ap.parse_args()
    p = load_params("cpt", CptParams)
    if not p.enabled:  # SFT starts from the base itself
        if not Path(args.base, "manifest.json").exists():
            raise StageError(f"{args.base}: no manifest.json (run the base stage)")
        with atomic_path(args.out, is_dir=True) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(args.base, tmp)
        write_loss_curve(args.loss_plot, [])
        metrics = {"enabled": False}
    else:
        metrics = run_cpt(p, args)
    write_json(args.metrics, metrics)
    print(f"cpt: {metrics}")


if __name__ == "__main__":
    run_stage(main)
