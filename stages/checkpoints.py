"""Resumable training checkpoints for the train stage (both backends share the fingerprint).

A checkpoint is one folder, `<checkpoints>/hf/step-NNNNNN/`, renamed into place only when complete
(stages.common.atomic_path), so a SIGKILL never leaves a half-written one:
  adapter_config.json, adapter_model.safetensors   the LoRA weights (PEFT format)
  state.pt        optimizer, scheduler, RNG states (python, numpy, torch CPU and CUDA), the step
                  reached (its position in the data order), the loss curve and counters so far
  fingerprint.json  what the run was made from: train params, sha256 of the data and base files
A rerun with train.resume auto continues from the newest checkpoint whose fingerprint matches;
otherwise it starts over (and says why in one line). Only the newest checkpoint is kept.
state.pt holds plain types and tensors only, so torch.load's weights_only default reads it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

from stages.common import StageError, atomic_path

STEP_DIR = re.compile(r"step-(\d{6,})")
# params that do not change what is trained: a rerun with another value may still resume
NOT_FINGERPRINTED = ("resume", "save_every")


# --- fingerprint ------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(params: dict, inputs: list[str | Path]) -> dict:
    """What a run is made from: its train params (less NOT_FINGERPRINTED) and the sha256 of every
    file of the inputs (files, or folders walked in name order)."""
    files = {}
    for item in map(Path, inputs):
        for path in sorted(item.rglob("*")) if item.is_dir() else [item]:
            if path.is_file():
                files[str(path)] = file_sha256(path)
    return {"params": {k: v for k, v in params.items() if k not in NOT_FINGERPRINTED}, "files": files}


def with_order(made_from: dict, plan: list) -> dict:
    """The fingerprint plus a digest of the run's data order (its steps' example indices), which
    step_tokens auto makes depend on the GPU as well as on params and data."""
    return dict(made_from, order=hashlib.sha256(json.dumps(plan).encode()).hexdigest())


def mismatch(saved: dict, current: dict) -> str | None:
    """Why a checkpoint made from `saved` cannot continue a run of `current` (None if it can)."""
    if saved.get("order") != current.get("order"):
        return "the data order changed (train.step_tokens auto measured another budget?)"
    for key in sorted(set(saved["params"]) | set(current["params"])):
        old, new = saved["params"].get(key), current["params"].get(key)
        if old != new:
            return f"train.{key} changed ({json.dumps(old)} -> {json.dumps(new)})"
    for path in sorted(set(saved["files"]) | set(current["files"])):
        if saved["files"].get(path) != current["files"].get(path):
            return f"{path} changed" if path in saved["files"] and path in current["files"] else \
                f"{path} {'is new' if path in current['files'] else 'is gone'}"
    return None


# --- RNG states -----------------------------------------------------------------------------------------

def rng_states() -> dict:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- save and load (hf backend) ---------------------------------------------------------------------

def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in folder, oldest first (temporaries start with a dot and never match)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in folder.iterdir() if d.is_dir() and (m := STEP_DIR.fullmatch(d.name))]
    return sorted(found)


def clear(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def save(folder: Path, step: int, model, optimizer, scheduler, run_state: dict, made_from: dict) -> Path:
    """Write step's checkpoint atomically, then drop the older ones."""
    import torch

    from stages.train import save_adapter

    target = folder / f"step-{step:06d}"
    with atomic_path(target, is_dir=True) as tmp:
        save_adapter(model, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_states(), "run": run_state}, tmp / "state.pt")
        (tmp / "fingerprint.json").write_text(json.dumps(made_from, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for _, older in checkpoint_steps(folder)[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    for leftover in folder.glob(".step-*"):  # temporaries of a killed save
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def find_resumable(folder: Path, made_from: dict, mode: str, total_steps: int) -> tuple[Path | None, str]:
    """(the newest checkpoint this run can continue from or None, a one-line reason when None and
    there were checkpoints). Checkpoints this run cannot use are removed; one at the last step is
    a finished run's, and a rerun trains afresh."""
    found = checkpoint_steps(folder)
    if not found or found[-1][0] >= total_steps:
        clear(folder)
        return None, ""
    step, newest = found[-1]
    if mode == "never":
        why = f"train.resume is never: {newest.name} ignored"
    else:
        try:
            saved = json.loads((newest / "fingerprint.json").read_text(encoding="utf-8"))
            why = mismatch(saved, made_from)
        except (OSError, ValueError, KeyError) as e:
            why = f"{newest / 'fingerprint.json'} unreadable ({e})"
    if why:
        clear(folder)
        return None, f"{why}; starting over"
    return newest, ""


def load(checkpoint: Path, model, optimizer, scheduler) -> dict:
    """Put the checkpoint's adapter weights, optimizer, scheduler and RNG states back; returns its
    state (step, run)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise StageError(f"{checkpoint}: adapter weights do not fit the model ({result.unexpected_keys[:3]})")
    state = torch.load(checkpoint / "state.pt", map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_states(state["rng"])
    return state
