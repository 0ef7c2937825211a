"""LoRA training throughput on one GPU: plain transformers + peft against the train stage's hf backend.

    PYTHONUNBUFFERED=1 python benchmarks/train_throughput.py --out benchmarks/results

Workload (issue 4): a random-init Llama shaped like InternLM2-1.8B (hidden 2048, 24 layers, 16 heads,
8 KV heads, FFN 8192, vocab 92,544), bf16, LoRA r=64 alpha=16 dropout 0.1 on all seven linear
projections, AdamW; sample lengths lognormal (median 265, mean 356, clipped to 16..2048), labels on
every token. Effective tokens are the samples' own tokens (no padding).

- baseline: plain transformers + peft, batches of 4 samples padded to the longest, gradient
  checkpointing, transformers' loss (what the issue measured at 3,211 tokens/s on an H100).
- project: the train stage's own functions (stages.train: build_model; stages.train_batches: plan_steps,
  make_batch; stages.train_step: train_step) with the TrainParams below: token-budget steps packed into rows, documents isolated.
- loss check: on a fixed batch after training, the project's packed loss against transformers' own
  unpacked loss (each sample alone, sdpa), both in eval mode (no dropout) under bf16 autocast.
- qlora: the project path with quantize=nf4 (bitsandbytes must be importable).

With --devices N [N...], the scaling benchmark instead (benchmarks/train_scaling.py): tokens/s and
memory per GPU of the 1.9B and a 7B workload on 1..N GPUs, and the scaling efficiency.

Prints one JSON object; with --out also writes it to <out>/train_throughput_<device>.json.
MFU = tokens/s x 4N / peak bf16 matmul rate (4N FLOPs a token for a frozen base: forward 2N, input
gradients 2N; N = all base parameters), against the rate measured in the same run and against 790.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.train import IGNORE, LoraParams, TrainParams, build_model  # noqa: E402
from stages.train_batches import collate, make_batch, plan_steps  # noqa: E402
from stages.train_step import batch_loss, make_optimizer, train_step  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INTERNLM2_1_8B = dict(vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
TARGET_TOKENS_PER_S = 45_000
ISSUE_BASELINE_TOKENS_PER_S = 3_211  # the issue's own measurement of the same baseline on the lent H100
STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(device) -> float | None:
    """bf16 8192^3 matrix products on random data: the ceiling MFU is taken against."""
    import torch

    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def make_samples(n: int, vocab: int, median: float, mean: float, lo: int, hi: int, seed: int) -> list[dict]:
    """Lognormal lengths (median, mean), clipped; random tokens; labels on every token."""
    import torch

    sigma = math.sqrt(2 * math.log(mean / median))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g)).round().clamp(lo, hi).long()
    samples = []
    for length in lengths.tolist():
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": list(ids)})
    return samples


def write_random_model(config: dict, folder: Path, device) -> int:
    """Random-init Llama saved as a bf16 checkpoint (the stage loads its base from a folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    n_params = sum(q.numel() for q in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return n_params


def timed_steps(step_fn, batches, warmup: int, device) -> dict:
    """Run warmup steps, then time the rest; step_fn(batch) -> loss tensor."""
    losses = []
    for batch in batches[:warmup]:
        step_fn(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        losses.append(step_fn(batch))
    sync(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "losses": [round(float(x), 4) for x in losses]}


def run_baseline(path: str, samples: list[dict], args, device) -> dict:
    """Plain transformers + peft: 4 samples padded to the longest, gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    reset_memory(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    model.train()
    n_steps = args.baseline_warmup + args.baseline_steps
    groups = [samples[i * 4:(i + 1) * 4] for i in range(n_steps)]

    def step(group):
        batch = {k: v.to(device) for k, v in collate(group, False, 0, 0).items()}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result = timed_steps(step, groups, args.baseline_warmup, device)
    tokens = sum(len(e["input_ids"]) for g in groups[args.baseline_warmup:] for e in g)
    if args.profile and device.type == "cuda":
        profile(step, groups[-2:], args, "profile_baseline.txt")
    out = {"tokens_per_s": round(tokens / result["seconds"], 1), "timed_steps": args.baseline_steps,
           "timed_tokens": tokens, "peak_memory_gib": peak_gib(device),
           "setup": "transformers+peft, sdpa, batch 4 padded to the longest, gradient checkpointing, "
                    "fp32 LoRA weights (peft default), transformers' loss",
           "losses": result["losses"]}
    del model, optimizer
    reset_memory(device)
    return out


def project_params(args, device, quantize: str = "none", compile_: bool | None = None,
                   attn: str | None = None) -> TrainParams:
    return TrainParams(
        lr=2e-4, dtype="bfloat16" if device.type == "cuda" else "float32", quantize=quantize,
        max_length=args.max_length, pack=True, pack_tokens=args.step_tokens, step_tokens=args.step_tokens,
        attn_implementation=attn or args.attn, loss_chunk_size=args.loss_chunk,
        compile=(not args.no_compile) if compile_ is None else compile_,
        gradient_checkpointing=False, lora=LoraParams(r=64, alpha=16, dropout=0.1, target_modules=TARGETS))


def run_project(path: str, samples: list[dict], p: TrainParams, args, device, n_params: int, peak: float | None,
                check: bool) -> dict:
    """The train stage's path: build_model, plan_steps (token budget), make_batch, train_step."""
    import torch

    reset_memory(device)
    torch.manual_seed(0)
    model = build_model(path, {"revision": None}, p, device)
    optimizer = make_optimizer(model, p, device)
    model.train()
    n_steps = args.warmup + args.steps * args.repeat
    steps = plan_steps(samples, p)[:n_steps]
    if len(steps) < n_steps:
        raise SystemExit("not enough samples for the requested steps")
    groups = [[samples[i] for i in s] for s in steps]
    step = lambda g: train_step(model, make_batch(g, p, 0, device), optimizer, p)  # noqa: E731
    t0 = time.perf_counter()
    for g in groups[:args.warmup]:  # torch.compile compiles here
        step(g)
    runs, losses = [], []
    for r in range(args.repeat):  # the same steps' code timed repeat times, on fresh batches each time
        chunk = groups[args.warmup + r * args.steps:args.warmup + (r + 1) * args.steps]
        result = timed_steps(step, chunk, 0, device)
        runs.append(sum(len(e["input_ids"]) for g in chunk for e in g) / result["seconds"])
        losses += result["losses"]
    log(f"project ({p.quantize}, compile={p.compile}): warmup+timed took {time.perf_counter() - t0:.1f}s")
    timed = groups[args.warmup:]
    tokens = sum(len(e["input_ids"]) for g in timed for e in g)
    rows = [make_batch(g, p, 0, "cpu")["input_ids"].shape for g in timed[:1]]
    tps = sorted(runs)[len(runs) // 2]
    out = {"tokens_per_s": round(tps, 1), "tokens_per_s_runs": [round(x, 1) for x in runs],
           "timed_steps": args.steps * args.repeat, "timed_tokens": tokens,
           "tokens_per_step": round(tokens / (args.steps * args.repeat)), "batch_shape_first_step": list(rows[0]),
           "peak_memory_gib": peak_gib(device),
           "mfu_4n_vs_measured_peak": round(tps * 4 * n_params / (peak * 1e12), 4) if peak else None,
           "mfu_4n_vs_790_tflops": round(tps * 4 * n_params / 790e12, 4),
           "params": {k: v for k, v in p.model_dump().items() if k not in ("backend", "seed", "epochs")},
           "losses": losses}
    if check:
        out["loss_check"] = loss_check(model, samples[-args.check_samples:], p, device)
    if args.profile and device.type == "cuda":
        profile(step, timed[:2], args, f"profile_{p.quantize}.txt")
    del model, optimizer
    reset_memory(device)
    return out


def profile(step_fn, groups, args, name: str) -> None:
    """GPU kernel time of a few steps, by kernel (to the log, and to <out>/<name>)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for g in groups:
            step_fn(g)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
    log("profile of %d steps:\n%s" % (len(groups), table))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(table)


def loss_check(model, fixed: list[dict], p: TrainParams, device) -> dict:
    """Packed + isolated (the project path) against unpacked: each sample alone, transformers' sdpa
    attention and loss. Eval mode (no dropout) with the adapters as trained by the timed steps."""
    import torch

    model.eval()
    eager = lambda: torch.compiler.set_stance("force_eager") if p.compile else _null()  # noqa: E731
    with torch.no_grad():
        packed = batch_loss(model, make_batch(fixed, p, 0, device), p).item()  # compiled, as trained
        with eager():  # the same path uncompiled: separates packing from the compiler's bf16 rounding
            packed_eager = batch_loss(model, make_batch(fixed, p, 0, device), p).item()
        lm = model.get_base_model()
        before = lm.config._attn_implementation
        lm.config._attn_implementation = "sdpa"
        reference = TrainParams(dtype=p.dtype, pack=False, max_length=p.max_length)
        with eager():
            total, count = 0.0, 0
            for e in fixed:  # one sample per batch: no padding, no packing
                n = sum(t != IGNORE for t in e["labels"][1:])
                total += batch_loss(model, make_batch([e], reference, 0, device), reference).item() * n
                count += n
        lm.config._attn_implementation = before
    model.train()
    unpacked = total / count
    return {"samples": len(fixed), "tokens": sum(len(e["input_ids"]) for e in fixed), "packed_loss": round(packed, 6),
            "unpacked_loss": round(unpacked, 6), "abs_diff": abs(packed - unpacked),
            "within_1e-3": abs(packed - unpacked) < 1e-3, "packed_loss_uncompiled": round(packed_eager, 6),
            "abs_diff_uncompiled": abs(packed_eager - unpacked)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_qlora(path, samples, args, device, n_params, peak) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return {"skipped": f"bitsandbytes not importable here: {e}"}
    attempts = [True, False] if not args.no_compile else [False]
    errors = {}
    for compile_ in attempts:
        try:
            result = run_project(path, samples, project_params(args, device, "nf4", compile_), args, device, n_params,
                                 peak, check=False)
            result["bitsandbytes"] = bitsandbytes.__version__
            if errors:
                result["compile_failed"] = errors
            return result
        except Exception as e:  # noqa: BLE001 - report what failed, then try without compile
            errors[f"compile={compile_}"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"qlora compile={compile_} failed: {errors[f'compile={compile_}']}")
            reset_memory(device)
    return {"failed": errors}


def main() -> None:
    if "--devices" in sys.argv:  # several GPUs: tokens/s and scaling efficiency on 1..N (benchmarks/train_scaling.py)
        from train_scaling import main as scaling

        return scaling(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for train_throughput_<device>.json")
    ap.add_argument("--steps", type=int, default=10, help="timed project steps, per repeat")
    ap.add_argument("--repeat", type=int, default=3, help="time the project this many times; report the median")
    ap.add_argument("--warmup", type=int, default=3, help="untimed project steps (compilation happens here)")
    ap.add_argument("--baseline-steps", type=int, default=12)
    ap.add_argument("--baseline-warmup", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=16384, help="token budget (and packed row length) of a step")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--attn", default="varlen", choices=["varlen", "flex_attention", "sdpa"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--check-samples", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], choices=["baseline", "qlora", "check"])
    ap.add_argument("--also", nargs="*", default=[], choices=["no_compile", "flex_attention"],
                    help="also time these variants of the project settings")
    ap.add_argument("--profile", action="store_true", help="kernel-time table of two project steps")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny samples: exercise the code (CPU ok)")
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    config = SMOKE if args.smoke else INTERNLM2_1_8B
    lengths = (26, 36, 4, 200) if args.smoke else (265, 356, 16, 2048)
    args.max_length = lengths[3]  # samples are clipped to this, so nothing is truncated
    peak = matmul_tflops(device)
    log(f"{name}: bf16 matmul {peak} TFLOP/s")
    report = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "measured_bf16_matmul_tflops": peak,
              "workload": {"model": "random-init Llama, InternLM2-1.8B shape" if not args.smoke else "smoke",
                           "config": config, "lora": "r=64 alpha=16 dropout=0.1, 7 projections",
                           "sample_lengths": "lognormal median %d mean %d clipped %d..%d" % lengths,
                           "labels": "every token"}}
    n_samples = max(64, (args.warmup + args.steps * args.repeat + 2) * args.step_tokens // lengths[1] * 12 // 10)
    samples = make_samples(n_samples, config["vocab_size"], *lengths, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        n_params = write_random_model(config, Path(folder), device)
        report["workload"]["base_params"] = n_params
        log(f"model: {n_params / 1e9:.3f}B params written")
        if "baseline" not in args.skip:
            report["baseline"] = run_baseline(folder, samples, args, device)
            log(f"baseline: {report['baseline']['tokens_per_s']} tokens/s")
        p = project_params(args, device)
        try:
            report["project"] = run_project(folder, samples, p, args, device, n_params, peak, "check" not in args.skip)
        except Exception as e:  # noqa: BLE001 - say so in the report and measure the uncompiled path instead
            if not p.compile:
                raise
            traceback.print_exc()
            log(f"project with compile failed: {type(e).__name__}: {e}")
            reset_memory(device)
            report["project"] = run_project(folder, samples, project_params(args, device, compile_=False), args,
                                            device, n_params, peak, "check" not in args.skip)
            report["project"]["compile_failed"] = f"{type(e).__name__}: {str(e)[:500]}"
        log(f"project: {report['project']['tokens_per_s']} tokens/s")
        if "baseline" in report:
            report["ratio"] = round(report["project"]["tokens_per_s"] / report["baseline"]["tokens_per_s"], 2)
        report["ratio_vs_issue_baseline_3211"] = round(
            report["project"]["tokens_per_s"] / ISSUE_BASELINE_TOKENS_PER_S, 2)
        report["target_tokens_per_s"] = TARGET_TOKENS_PER_S
        report["target_met"] = report["project"]["tokens_per_s"] >= TARGET_TOKENS_PER_S
        report["xtuner"] = ("not measured: xtuner 0.2 needs transformers 4.48 + mmengine, and isolates packed "
                            "samples only through flash-attn, which is not on the GPU machine")
        if "qlora" not in args.skip:
            report["qlora"] = run_qlora(folder, samples, args, device, n_params, peak)
            log(f"qlora: {report['qlora'].get('tokens_per_s', report['qlora'])}")
        save(report, name, args)  # written now too, in case the variants below run out of time
        variants = {"no_compile": dict(compile_=False), "flex_attention": dict(attn="flex_attention")}
        for variant in args.also:  # other settings of the same path, for comparison (one timing each)
            try:
                report.setdefault("variants", {})[variant] = run_project(
                    folder, samples, project_params(args, device, **variants[variant]),
                    argparse.Namespace(**{**vars(args), "repeat": 1, "profile": False}), device, n_params, peak,
                    check=False)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report.setdefault("variants", {})[variant] = {"failed": f"{type(e).__name__}: {str(e)[:500]}"}
                reset_memory(device)
            log(f"variant {variant}: {report['variants'][variant].get('tokens_per_s')}")
    print(save(report, name, args))


def save(report: dict, name: str, args) -> str:
    text = json.dumps(report, indent=1)
    if args.out:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"train_throughput_{slug}.json").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
