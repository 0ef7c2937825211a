"""The little that stages share: params, atomic outputs, jsonl, the one chat template.

Kept to the standard library plus pyyaml and pydantic, because stages run in several
environments (core, xtuner, lmdeploy, opencompass) and every one of them imports this.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
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
        validated = schema.model_validate(everything[section])
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join([section, *map(str, err["loc"])])
            problems.append(f"{path}: {key}: {err['msg']}")
        raise StageError("\n".join(problems)) from None
    from stages.params_check import check_params  # here: it imports StageError from this module

    check_params(everything, path)  # contradictions between sections stop every stage before its work
    return validated


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
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs should read like any other folder
    target = tmp if is_dir else tmp / final.name
    reap_if_killed(tmp)
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(target, final)
    except Exception as e:
        if is_disk_full(e):
            shutil.rmtree(tmp, ignore_errors=True)  # first, so the free space below counts what it held
            raise StageError(f"{final}: disk full while writing it ({free_space(final.parent)} free in "
                             f"{final.parent}); nothing was written: free space and rerun") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        reap_if_killed(tmp, done=True)


# Temporaries of atomic_path are named .<out name>.tmp-<pid>-<random>, beside the out.
TEMP_MARK = ".tmp-"
_REAPER_CODE = """
import shutil, sys
paths = set()
for line in sys.stdin:
    (paths.add if line[0] == "+" else paths.discard)(line[1:-1])
for path in paths:
    shutil.rmtree(path, ignore_errors=True)
"""
_reaper: subprocess.Popen | None = None


def reap_if_killed(tmp: Path, done: bool = False) -> None:
    """Tell this process's reaper about a temporary (or that it is gone). The reaper is a tiny
    process of its own session that removes what is still listed once this process dies, by
    SIGKILL or the OOM killer included: after such a death DVC often restores the out from its
    run-cache instead of rerunning the stage, and the temporary would stay beside the out."""
    global _reaper
    try:
        if _reaper is None or _reaper.poll() is not None:
            if done:
                return
            _reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER_CODE], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                       start_new_session=True)
        _reaper.stdin.write(f"{'-' if done else '+'}{tmp}\n")
        _reaper.stdin.flush()
    except OSError:  # no reaper (e.g. no process to spare): remove_stale_temps still tidies on the next run
        pass


def remove_stale_temps(final: Path) -> None:
    """Temporaries of `final` whose process is gone (a machine that lost power kills the reaper too)."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}{TEMP_MARK}*"):
        pid = stale.name[len(final.name) + 1 + len(TEMP_MARK):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, as an OSError or as the message of a library that wraps it (safetensors' Rust
    "No space left on device (os error 28)", torch's "file write failed")."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)


def free_space(folder: Path) -> str:
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return ""


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user part (scheme://user:password@host) shown as ***, for
    printing and logging tracking and endpoint URIs; anything else unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(str(uri))
        password = parts.password
    except ValueError:  # not a URI (e.g. an unbalanced [ in the host): nothing we can tell apart
        return str(uri)
    if not password:
        return str(uri)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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
