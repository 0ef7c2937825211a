"""tunepipe serve: an OpenAI-compatible server for a model folder the pipeline wrote.

    tunepipe serve models/turbomind [--host 127.0.0.1] [--port 8000] [--backend auto|lmdeploy|transformers]

The same API from either backend: GET /v1/models (the served model), POST /v1/chat/completions
(non-streaming and `"stream": true`). The model's name in requests is the folder's name
(`merged`, `turbomind`, `adapter`), or --model-name.

- lmdeploy (`--backend auto` picks it where CUDA is visible and an interpreter that imports
  lmdeploy is found: this one, else .venvs/lmdeploy): `lmdeploy serve api_server DIR --backend
  pytorch`, lmdeploy's PyTorch engine (its TurboMind engine needs CUDA 12 libraries the lent GPU
  machine lacks), `--model-format awq` for the quantized artifact. No `--chat-template`: lmdeploy
  then renders with the tokenizer's own template, the pipeline's, and stops at its end-of-turn
  token, which the turbomind stage checks (check_chat_templates); the artifact's
  lmdeploy_chat_template.json would prepend an empty system turn to conversations without one.
- transformers (elsewhere: CPU, CI): transformers' own server, `transformers serve NAME`, pinned
  to the folder, run with stages/shims.py's "serve" shims. It takes its defaults from the folder's
  generation_config.json: greedy, stopping at the stop tokens merge wrote there.

Folders: a Hugging Face model folder is served as it is. An adapter is merged onto its base
(--base, else its adapter_config.json) into a temporary folder first; the AWQ artifact, for the
transformers backend, is dequantized into one (as `tunepipe chat` and the eval stage's CPU
fallback do). Temporary folders are removed when the server stops.

`served(model_dir)` starts a server on a free 127.0.0.1 port, waits until /v1/models lists the
model, yields the base URL (http://127.0.0.1:PORT/v1) and stops it (the whole process group).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from stages.chat import load_chat_model, model_kind
from stages.common import StageError, pick_device, pick_dtype
from stages.merge import TOKENIZER_FILES
from stages.remote_code import load_kwargs

REPO = Path(__file__).resolve().parents[1]
LMDEPLOY_VENV_PYTHON = REPO / ".venvs" / "lmdeploy" / "bin" / "python"


@dataclass
class ServerPlan:
    backend: str                   # "lmdeploy" or "transformers"
    command: list[str]
    cwd: Path
    env: dict
    name: str                      # the served model's name
    keep: list = field(default_factory=list)  # temporary folders that live as long as the server


# --- which backend ------------------------------------------------------------------------------

def lmdeploy_python() -> str | None:
    """An interpreter that imports lmdeploy: this one, else .venvs/lmdeploy's."""
    for python in dict.fromkeys([sys.executable, str(LMDEPLOY_VENV_PYTHON)]):
        if Path(python).exists() and subprocess.run([python, "-c", "import lmdeploy"], capture_output=True,
                                                    timeout=300).returncode == 0:
            return python
    return None


def pick_backend(setting: str) -> tuple[str, str | None]:
    """(backend, lmdeploy's python) for --backend auto / lmdeploy / transformers."""
    if setting == "transformers":
        return "transformers", None
    import torch

    cuda = torch.cuda.is_available()
    python = lmdeploy_python() if cuda or setting == "lmdeploy" else None
    if setting == "lmdeploy" and not (cuda and python):
        raise StageError(f"--backend lmdeploy needs CUDA ({'visible' if cuda else 'not visible'}) and an interpreter "
                         f"that imports lmdeploy ({python or 'none: not here, nor in .venvs/lmdeploy'})")
    return ("lmdeploy", python) if cuda and python else ("transformers", None)


# --- the commands -------------------------------------------------------------------------------

def lmdeploy_command(python: str, folder: Path, name: str, host: str, port: int) -> list[str]:
    """`lmdeploy serve api_server` with the PyTorch engine; AWQ weights as such."""
    command = [python, "-m", "lmdeploy", "serve", "api_server", str(folder), "--backend", "pytorch",
               "--server-name", host, "--server-port", str(port), "--model-name", name]
    if model_kind(folder) == "awq":
        command += ["--model-format", "awq"]
    return command


def transformers_command(name: str, host: str, port: int, device: str, dtype: str, remote_code: bool) -> list[str]:
    """`transformers serve NAME` (run from the folder's parent, so that the name is the folder's),
    through `python -m stages.shims --env serve`, which applies the serve shims first."""
    return [sys.executable, "-m", "stages.shims", "--env", "serve", "transformers.cli.transformers", "serve", name,
            "--host", host, "--port", str(port), "--device", device, "--dtype", dtype, "--log-level", "warning",
            *(["--trust-remote-code"] if remote_code else [])]


def servable_folder(model_dir: Path, base: str | None, backend: str, dtype: str, keep: list) -> Path:
    """The folder the server loads: the model folder itself, or a temporary one holding the adapter
    merged onto its base, or (transformers backend) the AWQ artifact dequantized."""
    kind = model_kind(model_dir)
    if kind == "hf" or (kind == "awq" and backend == "lmdeploy"):
        return model_dir
    tmp = tempfile.TemporaryDirectory(prefix="tunepipe-serve-")
    keep.append(tmp)
    out = Path(tmp.name) / model_dir.name
    if kind == "awq":
        from stages.eval import dequantize_awq

        dequantize_awq(model_dir, out, dtype)
        return out
    write_merged(model_dir, base, out, dtype)
    return out


def write_merged(adapter: Path, base: str | None, out: Path, dtype: str) -> None:
    """The adapter merged onto its base (peft merge_and_unload) as a model folder, with the tokenizer
    files as they are and the stop tokens in generation_config.json, as the merge stage writes them."""
    from transformers import GenerationConfig

    cm = load_chat_model(adapter, base, device="cpu", dtype=dtype)
    cm.model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    source = Path(cm.tokenizer.name_or_path)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if not (out / "tokenizer_config.json").is_file():
        cm.tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=cm.stop_ids, pad_token_id=cm.tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=128).save_pretrained(out)


def plan_server(model_dir: str | Path, base: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                backend: str = "auto", model_name: str | None = None) -> ServerPlan:
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise StageError(f"{model_dir}: not found")
    backend, python = pick_backend(backend)
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)          # as `tunepipe chat` loads it: the same greedy answers
    keep: list = []
    folder = servable_folder(model_dir, base, backend, dtype, keep)
    name = model_name or model_dir.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if backend == "lmdeploy":
        return ServerPlan(backend, lmdeploy_command(python, folder, name, host, port), REPO, env, name, keep)
    if name != folder.name:                     # transformers names the model by the path it loads
        link = Path(tempfile.mkdtemp(prefix="tunepipe-serve-"))
        keep.append(_Removed(link))
        (link / name).symlink_to(folder, target_is_directory=True)
        folder = link / name
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1")  # local folders only, nothing from a hub
    command = transformers_command(name, host, port, device, dtype, bool(load_kwargs(folder)))
    return ServerPlan("transformers", command, folder.parent, env, name, keep)


class _Removed:
    """A temporary folder removed on cleanup(), like TemporaryDirectory."""

    def __init__(self, path: Path):
        self.name = str(path)

    def cleanup(self) -> None:
        shutil.rmtree(self.name, ignore_errors=True)


# --- run ----------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listed_models(base_url: str) -> list[str]:
    with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def wait_until_listed(proc: subprocess.Popen, base_url: str, name: str, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise StageError(f"the server exited with status {proc.returncode} before answering {base_url}/models"
                             + (f":\n{tail}" if tail else ""))
        with contextlib.suppress(OSError, ValueError):
            if name in listed_models(base_url):
                return
        time.sleep(0.5)
    raise StageError(f"{base_url}/models did not list {name!r} within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def served(model_dir: str | Path, base: str | None = None, backend: str = "auto", host: str = "127.0.0.1",
           port: int | None = None, timeout: float | None = None, model_name: str | None = None) -> Iterator[str]:
    """Start a server for `model_dir`, wait until /v1/models lists it, yield its base URL
    (http://HOST:PORT/v1), stop it on exit. The server's output goes to a log shown on failure."""
    port = port or free_port(host)
    plan = plan_server(model_dir, base, host, port, backend, model_name)
    base_url = f"http://{host}:{port}/v1"
    logs = tempfile.TemporaryDirectory(prefix="tunepipe-serve-log-")
    log = Path(logs.name) / "server.log"
    try:
        with open(log, "wb") as sink:
            proc = subprocess.Popen(plan.command, cwd=plan.cwd, env=plan.env, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_listed(proc, base_url, plan.name, timeout or (900 if plan.backend == "lmdeploy" else 300), log)
            yield base_url
        finally:
            stop(proc)
    finally:
        for tmp in [*plan.keep, logs]:
            tmp.cleanup()


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="models/turbomind, models/merged, models/adapter, ...")
    p.add_argument("--base", help="an adapter's base (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("auto", "lmdeploy", "transformers"), default="auto",
                   help="auto: lmdeploy where CUDA and lmdeploy are there, else transformers")
    p.add_argument("--model-name", help="the name requests use (default: the folder's name)")


def run_serve(args) -> int:
    """The front door: run the server in the foreground until Ctrl-C (or it exits)."""
    plan = plan_server(args.model, args.base, args.host, args.port, args.backend, args.model_name)
    print(f"[serve] {plan.backend}: {' '.join(plan.command)}\n[serve] model {plan.name!r} at "
          f"http://{args.host}:{args.port}/v1 (GET /models, POST /chat/completions)", file=sys.stderr, flush=True)
    proc = subprocess.Popen(plan.command, cwd=plan.cwd, env=plan.env, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # `kill` stops the server too (finally below)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
        for tmp in plan.keep:
            tmp.cleanup()


if __name__ == "__main__":  # `python -m stages.serve MODEL ...` = `tunepipe serve MODEL ...`, without the
    import argparse           # other commands' imports (the eval stage starts it this way)

    parser = argparse.ArgumentParser(prog="tunepipe serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        sys.exit(run_serve(parser.parse_args()))
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
