"""Secrets never leak: a canary token in HF_TOKEN and in the LLM judge's key variable, a full
`dvc repro` (the judge enabled, answering from a local OpenAI-compatible stub), then every file the
run left (MLflow's sqlite db and artifacts, logs, metrics, outs, DVC's cache, dvc.lock, what git
would commit) and everything it printed is searched for the canary."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.common import redact_uri

CANARY = "tpcanary-" + uuid.uuid4().hex  # made per run: this file (copied into the run) must not contain it
JUDGE_KEY_ENV = "TUNEPIPE_JUDGE_API_KEY"  # params.yaml clean.judge.api_key_env


def test_redact_uri_hides_passwords_only():
    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/x?y=1") == "https://alice:***@mlflow.example.com:5000/x?y=1"
    assert redact_uri("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    for plain in ["sqlite:///mlflow.db", "http://127.0.0.1:5000", "https://token@host/v1", "databricks", "not a uri["]:
        assert redact_uri(plain) == plain


class JudgeStub(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that scores every answer 8 and remembers the keys sent."""
    keys: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        JudgeStub.keys.append(self.headers.get("Authorization", ""))
        body = json.dumps({"choices": [{"message": {"content": "8"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for folder, dirs, files in os.walk(root):  # .venvs is a symlink: not followed
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path.relative_to(root)))
    return hits


def test_canary_never_leaks_from_a_full_run(tmp_path, monkeypatch):
    from test_pipeline_e2e import make_checkout

    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv(JUDGE_KEY_ENV, CANARY)
    judge = {"enabled": True, "model": "stub-judge", "url": f"http://127.0.0.1:{server.server_port}/v1",
             "api_key_env": JUDGE_KEY_ENV, "max_workers": 2}
    try:
        root, env, printed = make_checkout(tmp_path / "run", {"clean": {"judge": judge}})
    finally:
        server.shutdown()
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
