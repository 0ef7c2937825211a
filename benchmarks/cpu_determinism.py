"""Which CPU math knobs change the bits of the demo base model and a short train, and what the pin costs.

    .venvs/core/bin/python benchmarks/cpu_determinism.py [--only NAME ...] [--out results/cpu_determinism_<cpu>.json]

Runs the data stages once, then for each configuration below `python -m stages.base` and
`python -m stages.train` in a fresh process with the tests' small settings (tests/conftest.py
FAST_PARAMS: 40 pre-train steps, 2 layers, 1 epoch), and prints the sha256 of the base weights
and of the adapter, the final train loss and the seconds each stage took. Every knob variable is
removed from the environment first, then the configuration's own are set; `unpinned` runs set
TUNEPIPE_PIN_CPU_MATH=0 (the machine's defaults), `pin` runs leave stages.common.pin_cpu_math()
to choose. MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA cap those libraries' instruction sets
as an older processor would. Not run in CI: ~1.5 min a configuration on two cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {"base": {"demo": {"pretrain_steps": 40, "num_layers": 2}}, "train": {"epochs": 1}}
KNOBS = ["ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
         "MKL_NUM_THREADS", "MKL_DYNAMIC", "TUNEPIPE_PIN_CPU_MATH", "TUNEPIPE_CPU_THREADS"]
OFF = {"TUNEPIPE_PIN_CPU_MATH": "0"}
CONFIGS = {
    "unpinned": OFF,
    "unpinned aten=avx2": {**OFF, "ATEN_CPU_CAPABILITY": "avx2"},
    "unpinned aten=default": {**OFF, "ATEN_CPU_CAPABILITY": "default"},
    "unpinned mkl_cbwr=COMPATIBLE": {**OFF, "MKL_CBWR": "COMPATIBLE"},
    "unpinned mkl_cbwr=AUTO": {**OFF, "MKL_CBWR": "AUTO"},
    "unpinned mkl_cbwr=AVX2": {**OFF, "MKL_CBWR": "AVX2"},
    "unpinned mkl isa<=AVX2": {**OFF, "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "unpinned onednn isa<=AVX2": {**OFF, "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "unpinned threads=1": {**OFF, "OMP_NUM_THREADS": "1"},
    "unpinned threads=4": {**OFF, "OMP_NUM_THREADS": "4"},
    "pin": {},
    "pin, mkl isa<=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "pin, onednn isa<=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pin, threads=1": {"OMP_NUM_THREADS": "1"},
    "pin, threads=4": {"OMP_NUM_THREADS": "4"},
    "pin, mkl_cbwr=COMPATIBLE,STRICT": {"MKL_CBWR": "COMPATIBLE,STRICT"},
    "pin, mkl_cbwr=AVX2": {"MKL_CBWR": "AVX2"},
    "pin, mkl_cbwr=AVX2,STRICT": {"MKL_CBWR": "AVX2,STRICT"},
    "pin, aten=default": {"ATEN_CPU_CAPABILITY": "default"},
    "pin, onednn isa<=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "pin, mkl threads=1": {"MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"},
}
PROBE = ("import stages, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "
         "__import__('os').environ.get('MKL_CBWR'))")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage(folder: Path, env: dict, name: str, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=folder, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--data", type=Path, help="a folder whose data/ came from an earlier run's data stages (copied, "
                    "not rerun: another machine's interpreter may lack the data stages' packages)")
    ap.add_argument("--keep-data", type=Path, help="copy the data stages' data/ here, for --data elsewhere")
    args = ap.parse_args()
    clean_env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    clean_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    folder = Path(tempfile.mkdtemp(prefix="cpu_determinism."))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, changes in SMALL.items():
        params[section].update({k: (dict(params[section][k], **v) if isinstance(v, dict) else v) for k, v in changes.items()})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if args.data:
        shutil.copytree(args.data / "data", folder / "data")
    else:
        for name in ["demo_data", "ingest", "clean", "split"]:
            stage(folder, clean_env, name)
    if args.keep_data:
        shutil.copytree(folder / "data", args.keep_data / "data", dirs_exist_ok=True)

    results = []
    for name, changes in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        env = dict(clean_env, **changes)
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        shutil.rmtree(folder / "models", ignore_errors=True)
        base_s, train_s = stage(folder, env, "base"), stage(folder, env, "train", "--base", "models/base")
        metrics = json.loads((folder / "metrics/train.json").read_text())
        row = {"config": name, "env": changes, "capability threads cbwr": probe.stdout.strip(),
               "base": sha(folder / "models/base/model.safetensors"),
               "adapter": sha(folder / "models/adapter/adapter_model.safetensors"),
               "train_loss_final": metrics["train_loss_final"], "base_s": base_s, "train_s": train_s,
               "train_runtime_s": metrics["runtime_s"]}
        results.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "tokenizers")}
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "versions": versions,
                                              "results": results}, indent=2) + "\n")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
