"""GPU benchmark of the model stages: base -> train -> merge -> turbomind -> eval -> register (issue 11).

Per model shape (random init, bf16, written to a local folder: no hub), each stage runs as
`python -m stages.<name>` in its own process, as dvc runs it, in <workdir>/<model>/ with its own
params.yaml. Per stage: wall seconds, the GPU's peak memory.used (nvidia-smi every 0.5 s while it
runs), the stage's own peak where its metrics report one, and its metrics. One table on stdout; the
JSON (rewritten after every stage) and every stage's log go next to --out.

Shapes: qwen2.5-1.5b (Qwen2ForCausalLM, tied embeddings) and internlm2-7b: the InternLM2 remote-code
fixture (tests/remote_code_fixture.py) at 7B sizes, converted to Llama by the base stage, where this
checkout has both; else the same shape built directly as LlamaForCausalLM (the output says which).
Data: 2,000 conversations of ../shared/data's Chinese medical dialogues, split 1800/100/100 into
.whl/gpubench-data/ here (../shared does not travel; benchmarks/gpu_wheels.sh makes it with the wheels).
Stdlib only: the model writer and the params check run in the stages' python (gpu_pipeline_workers.py).
"""
from __future__ import annotations

import argparse, csv, hashlib, json, os, random, shutil, subprocess, sys, threading, time  # noqa: E401
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_CSV = REPO.parent / "shared/data/chinese_medical_dialogue/neike_5000_6000_gb18030.csv"
SHAPES = {  # step_tokens: the fixed budget where this checkout's train stage has no step_tokens auto
    "qwen2.5-1.5b": dict(arch="qwen2", hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                         vocab=151936, tie=True, step_tokens=16384),
    "internlm2-7b": dict(arch="internlm2", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                         vocab=92544, tie=False, step_tokens=4096)}
# --tiny: head size 64, AWQ groups of 128, more embedding rows than the tokenizer has (as above)
TINY = dict(hidden=128, intermediate=384, layers=2, heads=2, kv_heads=1, vocab=16384, step_tokens=2048)
STAGES = ["base", "cpt", "train", "dpo", "merge", "turbomind", "eval", "register"]  # cpt, dpo: off (copies)
NEEDS = {"train": "base", "merge": "train", "turbomind": "merge", "eval": "merge", "register": "merge"}
VENVS = {"turbomind": "lmdeploy", "eval": "opencompass"}  # --venvs: as dvc.yaml; other stages: core
ARGS = {  # each stage's paths, as dvc.yaml gives them
    "base": "--corpus none.txt --out models/base",
    "cpt": "--corpus data/split/corpus.jsonl --base models/base --out models/sft_base --metrics metrics/cpt.json "
           "--loss-plot plots/cpt_loss.csv",
    "train": "--train data/split/train.jsonl --val data/split/val.jsonl --base models/sft_base --out models/adapter "
             "--checkpoints models/checkpoints --metrics metrics/train.json --loss-plot plots/train_loss.csv",
    "dpo": "--base models/sft_base --adapter models/adapter --train data/split/preference_train.jsonl "
           "--test data/split/preference_test.jsonl --out models/dpo_adapter --metrics metrics/dpo.json "
           "--plot plots/dpo_steps.csv",
    "merge": "--base models/sft_base --adapter models/dpo_adapter --val data/split/val.jsonl --out models/merged "
             "--metrics metrics/merge.json",
    "turbomind": "--merged models/merged --train data/split/train.jsonl --out models/turbomind "
                 "--metrics metrics/turbomind.json",
    "eval": "--base models/base --merged models/merged --turbomind models/turbomind --test data/split/test.jsonl "
            "--out eval --metrics metrics/eval.json",
    "register": "--metrics-dir metrics --plots-dir plots --merged models/merged --adapter models/dpo_adapter "
                "--base models/sft_base --turbomind models/turbomind --out registry/record.json"}
SPLITS = {"train": 0.9, "val": 0.05, "test": 0.05}
SHOWN = {"train": ["tokens_per_s", "step_tokens", "steps", "train_loss_final"], "merge": ["device", "dtype", "rel_logit_diff"],
         "turbomind": ["top1_agreement", "logits_rel_error_mean"], "register": ["version"]}
# `import opencompass.datasets` imports these for datasets this benchmark does not run; where one is
# not installed, the eval stage gets a stand-in that raises only if used
STAND_INS = ["jieba", "tree_sitter", "tree_sitter_languages"]
STAND_IN = ('"""Stand-in written by benchmarks/gpu_pipeline.py: {0} is not installed here."""\n\n\n'
            "def __getattr__(name):\n    if name.startswith('__'):\n        raise AttributeError(name)\n\n"
            "    def missing(*args, **kwargs):\n        raise ImportError('{0} is not installed (a stand-in)')\n"
            "    return missing\n")


def prepare_data(data: Path, rows: int = 2000) -> None:
    """Canonical records {id, messages} of the first `rows` distinct (ask, answer) pairs, shuffled, split."""
    if not SOURCE_CSV.exists():
        sys.exit(f"{data}: no split files, and no {SOURCE_CSV} to make them (run benchmarks/gpu_wheels.sh there)")
    records, seen = [], set()
    with open(SOURCE_CSV, encoding="gb18030", newline="") as f:
        for r in csv.DictReader(f):
            q, a = (r["ask"] or "").strip(), (r["answer"] or "").strip()
            if q and a and q != "无" and (q, a) not in seen and len(records) < rows:
                seen.add((q, a))
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                key = json.dumps([[m["role"], m["content"]] for m in msgs], ensure_ascii=False)
                records.append({"id": hashlib.sha256(key.encode()).hexdigest()[:16], "messages": msgs})
    random.Random(0).shuffle(records)
    data.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, share in SPLITS.items():
        n = round(rows * share) if name != "test" else len(records) - start
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records[start:start + n])
        start += n


# --- orchestration ------------------------------------------------------------------------------------

class GpuPeak(threading.Thread):
    """Max of nvidia-smi's memory.used (MiB) of the first visible GPU, sampled every 0.5 s until stop()."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = None, threading.Event()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        self.cmd = ["nvidia-smi", f"--id={gpu if gpu.isdigit() else 0}", "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits"]

    def run(self):
        while not self.done.is_set():
            try:
                used = int(subprocess.run(self.cmd, capture_output=True, text=True, timeout=10).stdout.split()[0])
                self.peak = max(self.peak or 0, used)
            except FileNotFoundError:
                return  # no nvidia-smi: a CPU run
            except (ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.done.wait(0.5)

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    sampler, start = GpuPeak(), time.perf_counter()
    sampler.start()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"status": "ok" if rc == 0 else f"failed (exit {rc})", "wall_s": round(time.perf_counter() - start, 1),
           "gpu_peak_mib": sampler.stop(), "disk_free_gb": round(shutil.disk_usage(cwd).free / 2**30, 1)}
    if rc:
        tail = log.read_text(errors="replace").splitlines(True)[-25:]
        print(f"    {log}, last lines:\n" + "".join(f"    | {line}" for line in tail), end="", flush=True)
    return row


def worker(python: str, kind: str, spec: dict, cwd: Path, env: dict) -> tuple[dict, dict]:
    """Run worker_<kind>(spec) in `python`: (its timed row, its result or {} if it failed)."""
    (cwd / f"{kind}.json").write_text(json.dumps(spec))
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gpu_pipeline_workers as w; "
            f"json.dump(w.worker_{kind}(json.load(open('{kind}.json'))), open('{kind}.out.json', 'w'))")
    row = timed([python, "-c", code], cwd, env, cwd / f"logs/{kind}.log")
    return row, (json.loads((cwd / f"{kind}.out.json").read_text()) if row["status"] == "ok" else {})


def metrics_of(stage: str, cwd: Path) -> dict:
    path = cwd / ("registry/record.json" if stage == "register" else f"metrics/{stage}.json")
    return json.loads(path.read_text()) if path.exists() and stage != "base" else {}


def stand_ins(python: str, env: dict, folder: Path) -> list[str]:
    """Stand-ins in `folder` for the STAND_INS that `python` cannot import; their names."""
    code = f"import importlib.util as u; print(*[m for m in {STAND_INS!r} if u.find_spec(m) is None])"
    missing = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True).stdout.split()
    for name in missing:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(STAND_IN.format(name))
    return missing


def prune(stage: str, cwd: Path, source: Path) -> None:
    """Delete what no later stage reads: a 7B model is 15.5 GB a copy, the GPU machine has 64 GB of disk."""
    manifest = cwd / "models/base/manifest.json"
    converted = manifest.exists() and "conversion" in json.loads(manifest.read_text())
    for path in {"base": [source] if converted else [], "eval": [cwd / "eval/models", cwd / "models/turbomind"],
                 "register": [cwd / "models", cwd / "mlruns", source]}.get(stage, []):
        shutil.rmtree(path, ignore_errors=True)


def wanted_params(a, name: str, source: Path) -> dict:
    gpu = a.device == "cuda"
    return dict(
        base={"source": "hf", "model_id": str(source)},
        train={"backend": "hf", "epochs": 1, "lr": 3e-3, "max_length": 512, "batch_size": 8,
               "step_tokens": a.step_tokens if a.step_tokens == "auto" else int(a.step_tokens),
               "dtype": "bfloat16" if gpu else "float32", "attn_implementation": "varlen" if gpu else "sdpa",
               "loss_chunk_size": 4096},
        # the check still fails a lost or doubled adapter (~1); a few steps of LoRA on a random model
        # change it little, so bf16 rounding of W + BA is a larger share of that change than usual
        merge={"device": a.device, "dtype": "bfloat16" if gpu else "float32", "max_abs_logit_diff": 1e-2,
               "max_rel_logit_diff": 0.5},
        turbomind={"device": a.device, "dtype": "float16", "calib_samples": a.calib_samples, "calib_seqlen": 512,
                   "eval_rows": 4},
        eval={"device": a.device, "dtype": "auto", "models": a.eval_models,  # auto: bf16 on cuda, the AWQ model fp16
              "max_samples": a.eval_samples, "max_new_tokens": a.max_new_tokens, "batch_size": 16},
        register={"experiment": f"gpubench-{name}", "model_name": f"gpubench-{name}"},
        cpt={"enabled": False}, dpo={"enabled": False})  # off: they copy base / adapter on, as in the demo chain


def run_model(name: str, shape: dict, a, python: dict, results: dict, save) -> None:
    cwd, gpu = a.workdir / name, a.device == "cuda"
    source = cwd / "source_model"
    for split, share in SPLITS.items():  # the first rows * share rows of each split
        (cwd / "data/split").mkdir(parents=True, exist_ok=True)
        lines = (a.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(True)[:round(a.rows * share)]
        (cwd / f"data/split/{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    for empty in ("corpus", "preference_train", "preference_test"):  # cpt's and dpo's inputs (unread when off)
        (cwd / f"data/split/{empty}.jsonl").touch()
    (cwd / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, TUNEPIPE_PARAMS=str(cwd / "params.yaml"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{a.workdir}/mlflow.db",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    earlier = cwd / "benchmark.json"  # this model's rows so far: a run of later --stages continues them
    rec = results["models"][name] = json.loads(earlier.read_text()) if earlier.exists() and "base" not in a.stages \
        else {"shape": shape, "notes": [], "stages": {}}

    def say(text):
        rec["notes"].append(text)
        print(f"  [{name}] {text}", flush=True)

    size_gb = 2 * (shape["vocab"] * shape["hidden"] * (1 if shape["tie"] else 2) + shape["layers"] * shape["hidden"] * (
        2 * shape["hidden"] + 2 * shape["hidden"] * shape["kv_heads"] // shape["heads"] + 3 * shape["intermediate"])) / 1e9
    free_gb = shutil.disk_usage(a.workdir).free / 1e9
    rec["disk"] = {"model_gb": round(size_gb, 1), "peak_need_gb": round(3.3 * size_gb, 1), "free_gb": round(free_gb, 1)}
    if free_gb < 3.3 * size_gb:
        say(f"warning: {free_gb:.0f} GB of disk free; base + merged + turbomind + eval's dequantized copy "
            f"need ~{3.3 * size_gb:.0f} GB at once")
    row, checked = worker(python["base"], "check_params", {"params": wanted_params(a, name, source),
                                                           "step_tokens_fallback": shape["step_tokens"]}, cwd, env)
    if not checked:
        return say(f"params check failed: see {cwd}/logs/check_params.log")
    params, skip = checked["params"], {}
    for note in checked["notes"]:
        say(note)
    if gpu and "device" in checked["dropped"]["eval"]:
        skip["eval"] = "this checkout's eval stage has no eval.device: it would generate on the CPU"
    stages = [s for s in STAGES if s in a.stages]
    if "base" in stages and not (source / "config.json").exists():
        print(f"  [{name}] write the random-init model", flush=True)
        rec["stages"]["write"], info = worker(python["base"], "write_model", {
            "shape": shape, "out": str(source), "device": a.device, "tokenizer_vocab": a.tokenizer_vocab,
            "train": str(cwd / "data/split/train.jsonl")}, cwd, env)
        if not info:
            return
        results.setdefault("versions", {k: v for k, v in info.items() if k != "note"})
        say(info["note"])
    for stage in stages:
        need = NEEDS.get(stage)
        if stage in skip or rec["stages"].get(need, {}).get("status", "ok") != "ok":
            rec["stages"][stage] = {"status": "skipped: " + skip.get(stage, f"{need} did not succeed")}
            print(f"  [{name}] {stage}: {rec['stages'][stage]['status']}", flush=True)
            continue
        if stage == "eval" and rec["stages"].get("turbomind", {}).get("status", "ok") != "ok":
            params["eval"]["models"] = [m for m in params["eval"]["models"] if m != "turbomind"]
        (cwd / "params.yaml").write_text(json.dumps(params, indent=1))  # JSON is YAML
        cmd, stage_env = [python[stage], "-m", f"stages.{stage}", *ARGS[stage].split()], env
        if stage == "eval" and (missing := stand_ins(python[stage], env, a.workdir / "stand_ins")):
            say(f"eval: stand-in modules for {', '.join(missing)} (not installed; opencompass only imports them)")
            stage_env = dict(env, PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(a.workdir / "stand_ins")]))
        if stage == "train" and a.memory_cap_gb and gpu:  # the cap applies inside the train process only
            cmd[1:3] = ["-c", "import sys, stages, torch; total = torch.cuda.get_device_properties(0).total_memory; "
                              f"torch.cuda.set_per_process_memory_fraction(min(1.0, {a.memory_cap_gb} * 2**30 / total)); "
                              "sys.argv[0] = 'stages.train'; import stages.train as t; t.run_stage(t.main)"]
        print(f"  [{name}] {stage} ...", flush=True)
        row = rec["stages"][stage] = timed(cmd, cwd, stage_env, cwd / f"logs/{stage}.log")
        row["metrics"] = metrics_of(stage, cwd) if row["status"] == "ok" else {}
        print(f"  [{name}] {stage}: {row['status']} in {row['wall_s']} s, GPU peak {row['gpu_peak_mib']} MiB", flush=True)
        if not a.keep and row["status"] == "ok":
            prune(stage, cwd, source)
        earlier.write_text(json.dumps(rec))
        save()
    if not a.keep and "register" in a.stages:  # done with this model: the next one needs the disk
        prune("register", cwd, source)


def table(results: dict) -> str:
    lines = [f"{'model':<13} {'stage':<10} {'status':<8} {'wall s':>7} {'GPU MiB':>8} {'stage MiB':>9}  metrics"]
    for name, rec in results["models"].items():
        for stage, row in rec["stages"].items():
            m = row.get("metrics", {})
            shown = {f"{k}.rougeL": round(s["rougeL"], 2) for d in m.values() for k, s in d.items()} if stage == "eval" \
                else {k: round(m[k], 4) if isinstance(m[k], float) else m[k] for k in SHOWN.get(stage, []) if k in m}
            lines.append(f"{name:<13} {stage:<10} {row['status'][:8]:<8} {row.get('wall_s', ''):>7} "
                         f"{row.get('gpu_peak_mib') or '':>8} {m.get('peak_memory_mb', ''):>9}  "
                         + ", ".join(f"{k}={v}" for k, v in shown.items()))
        lines += [f"{name:<13} note: {note}" for note in rec["notes"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpubench"))
    ap.add_argument("--data", type=Path, default=REPO / ".whl/gpubench-data",
                    help="train/val/test.jsonl (made from ../shared/data when missing)")
    ap.add_argument("--prepare-data-only", action="store_true")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--stages", default=",".join(STAGES), 
                    help="later stages only: continue <workdir>/<model> of an earlier run")
    ap.add_argument("--tiny", action="store_true", help="hidden 128, 2 layers, 200 conversations (a CPU check)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--rows", type=int, help="conversations used, split 90/5/5 (default 2000; --tiny 200)")
    ap.add_argument("--step-tokens", default="auto", help="train.step_tokens: auto or a number")
    ap.add_argument("--memory-cap-gb", type=float, help="GiB the train process may use (set_per_process_memory_fraction)")
    ap.add_argument("--eval-samples", type=int, help="eval.max_samples (default 50; --tiny 8)")
    ap.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens (default 64; --tiny 16)")
    ap.add_argument("--eval-models", default="base,merged,turbomind")
    ap.add_argument("--calib-samples", type=int, default=32, help="turbomind.calib_samples (blocks of 512 tokens)")
    ap.add_argument("--tokenizer-vocab", type=int, default=8000, help="BPE vocabulary trained on the data")
    ap.add_argument("--python", action="append", default=[], metavar="STAGE=PATH", help="interpreter of a stage")
    ap.add_argument("--venvs", action="store_true", help="the interpreters of .venvs/, as dvc.yaml runs the stages")
    ap.add_argument("--keep", action="store_true", help="keep every model (default: delete what no later stage reads)")
    ap.add_argument("--out", type=Path, help="JSON file or folder (default benchmarks/results/gpu_pipeline_<gpu>.json)")
    a = ap.parse_args()
    a.rows = a.rows or (200 if a.tiny else 2000)
    a.eval_samples = a.eval_samples or (8 if a.tiny else 50)
    a.max_new_tokens = a.max_new_tokens or (16 if a.tiny else 64)
    a.eval_models, a.stages, a.workdir = a.eval_models.split(","), a.stages.split(","), a.workdir.resolve()
    if not (a.data / "train.jsonl").exists():
        prepare_data(a.data)
    if a.prepare_data_only:
        return print(f"data: {a.data}")
    python = {s: str(REPO / f".venvs/{VENVS.get(s, 'core')}/bin/python") if a.venvs else sys.executable for s in STAGES}
    python.update(p.split("=", 1) for p in a.python)
    query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True) if a.device == "cuda" and shutil.which("nvidia-smi") else None
    gpu = query.stdout.splitlines()[0].strip() if query and query.returncode == 0 else a.device
    out = a.out or REPO / "benchmarks/results"
    if out.suffix != ".json":
        subset = "" if a.models == ",".join(SHAPES) else "_" + a.models.replace(",", "_")
        out = out / f"gpu_pipeline_{gpu.replace(' ', '_')}{subset}{'_tiny' if a.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    a.workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results = {"gpu": gpu, "git_commit": commit or "unknown", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "args": {k: str(v) for k, v in vars(a).items()}, "python": python, "models": {}}

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")
        with open(out.with_suffix(".log"), "w") as log:  # every log of this run, in the order written
            for name in results["models"]:
                for f in sorted((a.workdir / name / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime):
                    log.write(f"===== {name} {f.stem}\n{f.read_text(errors='replace')[-20000:]}\n")

    for name in a.models.split(","):
        shape = dict(SHAPES[name], **(TINY if a.tiny else {}))
        print(f"== {name} on {gpu}: {shape}", flush=True)
        run_model(name, shape, a, python, results, save)
        save()
    print("\n" + table(results) + f"\n\nwritten: {out} and {out.with_suffix('.log').name}")


if __name__ == "__main__":
    main()
