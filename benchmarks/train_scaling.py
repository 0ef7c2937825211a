"""LoRA training throughput on 1..N GPUs (train.devices, train.sharding): `train_throughput.py --devices`.

    PYTHONUNBUFFERED=1 python benchmarks/train_throughput.py --devices 1 2 4 --sharding fsdp2 --out benchmarks/results
    python benchmarks/train_throughput.py --devices 1 --smoke      # a tiny model on the CPU: the code runs

For each workload (the 1.9B of train_throughput.py, InternLM2-1.8B-shaped, and a 7B Llama shaped
like InternLM2-7B, benchmarks/gpu_pipeline.py's internlm2-7b: hidden 4096, 32 layers, FFN 14336),
a random-init bf16 checkpoint is written once (no hub downloads), then for each N in --devices the
train stage's own step (stages.train_batches.make_batch, stages.train_step.batch_loss, stages.distributed.Sharded) runs on
N processes under torchrun: N=1 is the plain one-process path (sharding none). Weak scaling: each
process gets --step-tokens tokens a step (the global step is N times that), so tokens/s on N
devices against N x tokens/s on one is the scaling efficiency (the issue's goal: >= 0.9 at 2 and 4).
Memory per GPU is torch.cuda.max_memory_allocated of every rank (on a CPU: none).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stages.distributed import one_thread_each  # noqa: E402
from train_throughput import INTERNLM2_1_8B, SMOKE, TARGETS, make_samples, write_random_model  # noqa: E402

INTERNLM2_7B = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
WORKLOADS = {"1.9b": INTERNLM2_1_8B, "7b": INTERNLM2_7B}


def params(args, nproc: int, on_gpu: bool):
    from stages.train import LoraParams, TrainParams

    return TrainParams(
        lr=2e-4, dtype="bfloat16" if on_gpu else "float32", max_length=args.max_length, pack=True,
        pack_tokens=args.step_tokens, step_tokens=args.step_tokens * nproc,
        attn_implementation="varlen" if on_gpu else "sdpa", loss_chunk_size=args.loss_chunk if on_gpu else 0,
        compile=on_gpu and not args.no_compile, gradient_checkpointing=args.gradient_checkpointing,
        devices=nproc, sharding=args.sharding if nproc > 1 else "none", device="auto" if on_gpu else "cpu",
        lora=LoraParams(r=64, alpha=16, dropout=0.1, target_modules=TARGETS))


def constant_lr(optimizer):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def worker(args) -> None:
    """One rank (or the one process): train steps on the samples; rank 0 writes the JSON result."""
    import torch

    from stages import distributed
    from stages.common import pick_device
    from stages.train import build_model
    from stages.train_batches import make_batch, plan_steps
    from stages.train_step import batch_loss, make_optimizer, train_step

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    group = distributed.join(args.sharding, "auto" if on_gpu else "cpu") if nproc > 1 else None
    device = group.device if group else torch.device(pick_device("auto"))
    p = params(args, nproc, on_gpu)
    torch.manual_seed(0)
    model = build_model(args.model, {}, p, device)
    samples = json.loads(Path(args.samples).read_text())
    steps = plan_steps(samples, p, random.Random(0))[:args.warmup + args.steps]
    if len(steps) < args.warmup + args.steps:
        raise SystemExit(f"{len(steps)} steps of samples, {args.warmup + args.steps} asked: more samples needed")
    if group is None:
        optimizer = make_optimizer(model, p, device)
        step = lambda idx: train_step(model, make_batch([samples[i] for i in idx], p, 0, device), optimizer, p)  # noqa: E731
    else:
        sharded = distributed.Sharded(model, lambda m, b: batch_loss(m, b, p), group,
                                      lambda m: make_optimizer(m, p, device), constant_lr, p.dtype == "bfloat16")

        def step(idx):
            chunk, weight = distributed.local_step(idx, samples, group)
            return sharded.step(make_batch(chunk, p, 0, device), weight)
    for idx in steps[:args.warmup]:  # compilation happens here
        step(idx).item()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if group:
        torch.distributed.barrier()
    sync()
    started = time.perf_counter()
    for idx in steps[args.warmup:]:
        step(idx)
    sync()
    seconds = time.perf_counter() - started
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    peaks = [peak]
    if group:
        peaks = [None] * nproc
        torch.distributed.all_gather_object(peaks, peak)
    if group is None or group.main:
        tokens = sum(len(samples[i]["input_ids"]) for idx in steps[args.warmup:] for i in idx)
        Path(args.result).write_text(json.dumps({
            "devices": nproc, "sharding": p.sharding, "timed_steps": args.steps, "timed_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "peak_memory_gib_per_device": peaks}))
    distributed.leave()


def measure(args, workload: str, model: Path, samples: Path, nproc: int) -> dict:
    """One workload on nproc processes (torchrun for more than one), as a separate run."""
    result = model.parent / f"result-{workload}-{nproc}.json"
    common = ["--worker", "--model", str(model), "--samples", str(samples), "--result", str(result),
              *forwarded(args)]
    here = str(Path(__file__).resolve())
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", here]
           if nproc > 1 else [sys.executable, here]) + common
    env = one_thread_each(dict(os.environ))  # N=1 as each of N: one CPU thread (GPU runs: the host side)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode or not result.is_file():
        return {"devices": nproc, "failed": f"exit status {proc.returncode}"}
    return json.loads(result.read_text())


def forwarded(args) -> list[str]:
    out = ["--sharding", args.sharding, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--step-tokens", str(args.step_tokens), "--loss-chunk", str(args.loss_chunk),
           "--max-length", str(args.max_length)]
    return out + ["--no-compile"] * args.no_compile + ["--gradient-checkpointing"] * args.gradient_checkpointing


def efficiency(runs: list[dict]) -> dict:
    """tokens/s on N over N x tokens/s on 1, for every N measured beside N=1."""
    one = next((r["tokens_per_s"] for r in runs if r["devices"] == 1 and "tokens_per_s" in r), None)
    return {str(r["devices"]): round(r["tokens_per_s"] / (r["devices"] * one), 3)
            for r in runs if one and "tokens_per_s" in r}


def drive(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if max(args.devices) > 1 and device == "cuda" and max(args.devices) > torch.cuda.device_count():
        raise SystemExit(f"--devices {max(args.devices)}: only {torch.cuda.device_count()} GPU(s) visible")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    workloads = {"smoke": SMOKE} if args.smoke else {w: WORKLOADS[w] for w in args.workloads}
    report = {"device": name, "torch": torch.__version__, "sharding": args.sharding,
              "per_device_step_tokens": args.step_tokens, "workloads": {}}
    for workload, config in workloads.items():
        with tempfile.TemporaryDirectory() as folder:
            model, samples = Path(folder) / "model", Path(folder) / "samples.json"
            n_params = write_random_model(config, model, device)
            lengths = (26, 36, 4, 200) if args.smoke else (265, 356, 16, 2048)
            n = (args.warmup + args.steps + 2) * args.step_tokens * max(args.devices) // lengths[1] * 12 // 10
            samples.write_text(json.dumps(make_samples(max(n, 64), config["vocab_size"], *lengths, seed=0)))
            runs = [measure(args, workload, model, samples, nproc) for nproc in args.devices]
        report["workloads"][workload] = {"base_params": n_params, "config": config, "runs": runs,
                                         "scaling_efficiency": efficiency(runs)}
        for r in runs:
            print(f"{workload} x{r['devices']}: {r.get('tokens_per_s', r.get('failed'))} tokens/s, peak GiB per "
                  f"device {r.get('peak_memory_gib_per_device')}, efficiency "
                  f"{report['workloads'][workload]['scaling_efficiency'].get(str(r['devices']))}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", help="process counts to measure, e.g. 1 2 4")
    ap.add_argument("--sharding", default="fsdp2", choices=["ddp", "fsdp2", "zero2", "zero3"])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=16384, help="tokens a step per device (and packed row)")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny steps (CPU ok)")
    ap.add_argument("--out", help="folder for train_scaling_<sharding>.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--samples", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke and not args.worker:
        args.step_tokens, args.max_length, args.steps, args.warmup = 256, 200, 3, 1
    if args.worker:
        worker(args)
        return
    if not args.devices:
        ap.error("--devices N [N ...] is required")
    text = json.dumps(drive(args), indent=1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"train_scaling_{args.sharding}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
