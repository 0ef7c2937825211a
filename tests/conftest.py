"""Shared fixtures: a small copy of the pipeline run in a temporary folder, stage by stage."""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import stages  # noqa: F401  first: pins the CPU math (stages/common.py) before any test imports torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Smaller than params.yaml so the whole chain runs in seconds on two CPU cores.
FAST_PARAMS = {"base": {"demo": {"pretrain_steps": 40, "num_layers": 2}}, "train": {"epochs": 1}}


def deep_update(tree: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(tree.setdefault(key, {}), value)
        else:
            tree[key] = value
    return tree


def write_params(folder: Path, changes: dict | None = None) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, FAST_PARAMS)
    deep_update(params, changes or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@contextlib.contextmanager
def inside(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def run_stage(folder: Path, name: str, *args: str) -> None:
    """Run stages.<name>.main() in this process, in `folder`, as `python -m stages.<name> args`."""
    module = importlib.import_module(f"stages.{name}")
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with inside(folder):
            module.main()
    finally:
        sys.argv = argv


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """demo_data -> ingest -> clean -> split -> base -> train -> merge, with FAST_PARAMS."""
    folder = tmp_path_factory.mktemp("pipeline")
    write_params(folder)
    for stage in ["demo_data", "ingest", "clean", "split", "base", "train", "merge"]:
        run_stage(folder, stage)
    return folder


@pytest.fixture
def workdir(tmp_path) -> Path:
    write_params(tmp_path)
    return tmp_path


def venv_python(name: str) -> Path:
    python = REPO / ".venvs" / name / "bin" / "python"
    if not python.exists():
        pytest.skip(f".venvs/{name} is missing: run TUNEPIPE_ENVS={name} ./setup.sh")
    return python


def copy_outputs(src: Path, dst: Path, *paths: str) -> None:
    for rel in paths:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, dst / rel)
        else:
            shutil.copy2(src / rel, dst / rel)
