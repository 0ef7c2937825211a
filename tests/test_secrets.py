"""Secrets never leak: a canary token in HF_TOKEN and in the LLM judge's key variable, a full
`dvc repro` (the judge enabled, answering from a local OpenAI-compatible stub), then every file the
run left (MLflow's sqlite db and artifacts, logs, metrics, outs, DVC's cache, dvc.lock, what git
would commit) and everything it printed is searched for the canary.

The run is the session's full_run (tests/conftest.py), which sets the canary and the judge for
exactly this test; tests/test_pipeline_e2e.py shares it (its later `dvc exp run` and `dvc repro`
on the same checkout run with the canary set too, so when they ran first their files are searched as well)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import CANARY, JUDGE_KEY_ENV, JudgeStub

from stages.common import redact_uri


def test_redact_uri_hides_passwords_only():
    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/x?y=1") == "https://alice:***@mlflow.example.com:5000/x?y=1"
    assert redact_uri("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    for plain in ["sqlite:///mlflow.db", "http://127.0.0.1:5000", "https://token@host/v1", "databricks", "not a uri["]:
        assert redact_uri(plain) == plain


def files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for folder, dirs, files in os.walk(root):  # .venvs is a symlink: not followed
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path.relative_to(root)))
    return hits


def test_canary_never_leaks_from_a_full_run(full_run):
    root, env, printed = full_run
    assert env["HF_TOKEN"] == CANARY and env[JUDGE_KEY_ENV] == CANARY  # the run had the canary
    assert f"Bearer {CANARY}" in JudgeStub.keys  # the key was really in play
    assert CANARY not in printed
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.split()
    for must in ["dvc.lock", "registry/record.json", "metrics/clean.json"]:
        assert must in listed
    written = {p for p in ["mlflow.db", "mlruns", "mlartifacts", ".dvc/cache", "dvc.lock", "data/judge/cache.jsonl"]
               if (root / p).exists()}
    assert {"mlflow.db", ".dvc/cache", "dvc.lock", "data/judge/cache.jsonl"} <= written, written  # what is searched
    assert written & {"mlruns", "mlartifacts"}, written  # MLflow's artifact folder
    assert files_with(root, CANARY.encode()) == []
