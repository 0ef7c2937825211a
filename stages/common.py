"""The little that stages share: params, atomic outputs, jsonl, the one chat template.

Kept to the standard library plus pyyaml and pydantic, because stages run in several
environments (core, xtuner, lmdeploy, opencompass) and every one of them imports this.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from stages.chat_template import TEMPLATES

PARAMS_FILE = Path(os.environ.get("TUNEPIPE_PARAMS", "params.yaml"))

# CPU math pin. float32 results on the CPU differ in their last bits between x86-64 processors and
# thread counts: ATen picks its vector kernels by the processor (AVX-512 and AVX2 sum in different
# orders), MKL its GEMM code path (by instruction set and by vendor), oneDNN its bf16/fp16 kernels,
# and reductions are split by thread count. These variables fix one path that every x86-64
# processor with AVX2 runs alike. torch, MKL and oneDNN read them once, when they start, so
# `stages/__init__.py` calls pin_cpu_math() before any stage imports torch. A value already in the
# environment wins (a deliberate override; OMP_NUM_THREADS also sets the thread count), and
# TUNEPIPE_PIN_CPU_MATH=0 leaves the machine's defaults. CUDA kernels read none of them.
CPU_THREADS = 2  # CI's machine has 2 cores; a fixed count keeps thread-split reductions alike everywhere
CPU_MATH_PIN = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (default: AVX-512 where there is one)
    "MKL_CBWR": "COMPATIBLE",       # the one MKL code branch that Intel and AMD processors run alike
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN (bf16/fp16 matmul): no AVX-512/AMX kernels
    "MKL_DYNAMIC": "FALSE",         # MKL uses exactly MKL_NUM_THREADS threads...
    "MKL_NUM_THREADS": str(CPU_THREADS),  # ...and torch sizes its OpenMP pool from MKL's count
}


def pin_cpu_math() -> None:
    if os.environ.get("TUNEPIPE_PIN_CPU_MATH", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    for name, value in CPU_MATH_PIN.items():
        if name == "ATEN_CPU_CAPABILITY" and not _has_avx2():
            continue  # torch would run AVX2 code on a processor without it (SIGILL)
        if name == "MKL_NUM_THREADS":
            value = os.environ.get("OMP_NUM_THREADS", value)
        os.environ.setdefault(name, value)


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags


# The demo model's chat template (ChatML, as Qwen2 uses). Real base models bring their own;
# stages/chat_template.py is the one place that knows the formats.
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
STOP_TOKEN = IM_END
CHAT_TEMPLATE = TEMPLATES["chatml"]


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Plain-Python rendering of CHAT_TEMPLATE, for places without a tokenizer at hand."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class StageError(Exception):
    """An expected problem (bad input, bad params): reported in one line, exit code 1."""


class Params(BaseModel):
    """Base for each stage's params section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


P = TypeVar("P", bound=Params)


def load_params(section: str, schema: type[P], path: Path | None = None) -> P:
    path = path or PARAMS_FILE
    if not path.exists():
        raise StageError(f"{path}: params file not found")
    with open(path, encoding="utf-8") as f:
        everything = yaml.safe_load(f) or {}
    if section not in everything:
        raise StageError(f"{path}: section '{section}' is missing")
    try:
        return schema.model_validate(everything[section])
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join([section, *map(str, err["loc"])])
            problems.append(f"{path}: {key}: {err['msg']}")
        raise StageError("\n".join(problems)) from None


def stage_enabled(section: str, path: Path | None = None) -> bool:
    """`<section>.enabled` in params.yaml (False when the section or key is absent): how clean and
    split learn whether the optional dpo stage will read preference pairs."""
    path = path or PARAMS_FILE
    with open(path, encoding="utf-8") as f:
        everything = yaml.safe_load(f) or {}
    return bool((everything.get(section) or {}).get("enabled", False))


def run_stage(main) -> None:
    """Entry point for `python -m stages.X`: expected problems exit 1 without a traceback."""
    try:
        main()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def atomic_path(final: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only if the block succeeds,
    so a killed stage never leaves a half-written output for DVC to cache."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs should read like any other folder
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def content_id(messages: list[dict]) -> str:
    """Stable id of a conversation: same roles and texts, same id, whatever file it came from."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def resolve_base(base_dir: str | Path = "models/base") -> tuple[str, dict]:
    """Where to load the base model from, per the base stage's manifest: (path or hub id, the
    keyword arguments every `from_pretrained` of it takes: revision and trust_remote_code)."""
    manifest = json.loads((Path(base_dir) / "manifest.json").read_text(encoding="utf-8"))
    load = {"revision": None, "trust_remote_code": bool(manifest.get("trust_remote_code", False))}
    if manifest["source"] == "demo" or manifest.get("conversion"):  # the model is in base_dir itself
        return str(base_dir), load
    return manifest.get("local_path") or manifest["model_id"], dict(load, revision=manifest.get("revision"))


def load_base_tokenizer(base_dir: str | Path = "models/base"):
    """The base tokenizer with the chat template the pipeline uses: the base stage writes it into
    its out (with base.chat_template applied), so every stage renders conversations alike."""
    from transformers import AutoTokenizer

    path, load = resolve_base(base_dir)
    return AutoTokenizer.from_pretrained(base_dir if (Path(base_dir) / "tokenizer_config.json").exists() else path,
                                         **load)


def pick_device(setting: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; anything else as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(setting: str, device: str) -> str:
    """`auto` -> bfloat16 on cuda (half the memory, full speed on tensor cores), float32 on a CPU
    (where bf16 matmuls are slow and inexact); anything else as given. `device` as pick_device
    returns it, so callers can ask what a GPU machine would get."""
    if setting != "auto":
        return setting
    return "bfloat16" if device.startswith("cuda") else "float32"
