"""Shared fixtures: a small copy of the pipeline run in a temporary folder, stage by stage, and one
`dvc repro` of the whole chain in a fresh git checkout (full_run) that several test files read."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def folder_md5(folder: Path) -> dict:
    """{relative path: md5} of every file under folder: two folders compare equal byte for byte."""
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


SHARED_FIXTURES = ("full_run", "pipeline")  # session fixtures that cost minutes: built once, not once per worker


def pytest_collection_modifyitems(items):
    """Meant to put the tests of one costly session fixture on one worker under `-n 2 --dist loadgroup`
    (README's test command). It has no effect with pytest 9.2 and pytest-xdist 3.8.0: xdist appends the
    group to `item._nodeid`, which pytest 9.2 no longer reads (node ids come from `item._id`), so each
    worker builds the fixtures its tests need (CI's log shows full_run set up twice). Left as is until
    xdist supports pytest 9.2 or the run uses another grouping."""
    for item in items:
        shared = next((name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())), None)
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """demo_data -> ingest -> clean -> split -> base -> cpt -> train -> dpo -> merge, with FAST_PARAMS (cpt, dpo off)."""
    folder = tmp_path_factory.mktemp("pipeline")
    write_params(folder)
    for stage in ["demo_data", "ingest", "clean", "split", "base", "cpt", "train", "dpo", "merge"]:
        run_stage(folder, stage)
    return folder


ENVS = ["core", "xtuner", "lmdeploy", "opencompass"]
# On top of FAST_PARAMS for the `dvc repro` checkouts (turbomind runs three times in them): AWQ calibrated
# on fewer, shorter blocks, the same code path. Eval keeps every test row: register's gate (quantized
# within 3 points of merged, per set) must pass for upload to publish, and one mcq row of 12 is 8 points.
CHECKOUT_PARAMS = {"turbomind": {"calib_samples": 8, "calib_seqlen": 128}}
CANARY = "tpcanary-" + uuid.uuid4().hex  # made per session: no file copied into a run can contain it
JUDGE_KEY_ENV = "TUNEPIPE_JUDGE_API_KEY"  # params.yaml clean.judge.api_key_env


def sh(cwd: Path, *cmd: str, env=None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def make_checkout(root: Path, changes: dict | None = None, env_changes: dict | None = None) -> tuple[Path, dict, str]:
    """A fresh git checkout of the repo's files at `root`, FAST_PARAMS + CHECKOUT_PARAMS (+ changes), after `dvc repro`
    with os.environ (+ env_changes). Returns (root, the environment it ran in, what dvc repro printed)."""
    missing = [e for e in ENVS if not (REPO / ".venvs" / e / "bin/python").exists()]
    if missing:
        pytest.skip(f"environments missing: {missing}; run ./setup.sh")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("metrics/", "plots/", "registry/", "upload/")) and rel != "dvc.lock":
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / ".venvs").symlink_to(REPO / ".venvs")
    params = yaml.safe_load((root / "params.yaml").read_text())
    deep_update(params, FAST_PARAMS)
    deep_update(params, CHECKOUT_PARAMS)
    deep_update(params, changes or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **(env_changes or {}), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fresh checkout")
    first = sh(root, ".venvs/core/bin/dvc", "repro", env=env)
    return root, env, first


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


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """(root, env, printed): the whole chain by `dvc repro` in a fresh git checkout, FAST_PARAMS, run once
    per session for tests/test_pipeline_e2e.py and tests/test_secrets.py (a full run costs minutes).
    It runs as test_secrets needs: the LLM judge enabled against a local stub (it scores every row 8,
    above min_score, so the data are those of a judge-less run) and CANARY in HF_TOKEN and the judge's
    key variable, in `env` too, so every later `dvc repro`/`dvc exp run` on it carries the canary."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge = {"enabled": True, "model": "stub-judge", "url": f"http://127.0.0.1:{server.server_port}/v1",
             "api_key_env": JUDGE_KEY_ENV, "max_workers": 2}
    try:  # the stub stays up for the session: a rerun of clean would ask it again
        yield make_checkout(tmp_path_factory.mktemp("full_run"), {"clean": {"judge": judge}},
                            {"HF_TOKEN": CANARY, JUDGE_KEY_ENV: CANARY})
    finally:
        server.shutdown()


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


COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["sky", "grass", "sun", "snow", "coal", "milk", "plum", "carrot"]


def color_conversations(follow_ups: bool = True) -> list[list[dict]]:
    """24 tiny conversations with a learnable answer; follow_ups: every fifth gets a second turn."""
    convs = []
    for i in range(24):
        thing, color = THINGS[i % 8], COLORS[(i * 3) % 8]
        messages = [{"role": "system", "content": "You answer briefly."}] if i % 2 == 0 else []
        messages += [{"role": "user", "content": f"What color is the {thing}?"},
                     {"role": "assistant", "content": f"The {thing} is {color}."}]
        if follow_ups and i % 5 == 0:  # a few two-turn conversations
            messages += [{"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Yes."}]
        convs.append(messages)
    return convs


def write_records(path: Path, convs: list[list[dict]]) -> None:
    """Canonical records (id, source, messages, meta) of `convs`, one JSON object a line."""
    import json

    from stages.common import content_id

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row, messages in enumerate(convs):
            f.write(json.dumps({"id": content_id(messages), "source": {"file": "test", "row": row},
                                "messages": messages, "meta": {}}) + "\n")


def build_tiny_base(folder: Path, convs: list[list[dict]]) -> None:
    """The demo base model of stages/base.py, smaller, pre-trained on a few of the conversations
    only (so it knows the template, not the answers)."""
    from stages.base import DemoModelParams, build_tiny_model, save_portable_tokenizer
    from stages.common import render_chatml

    texts = [render_chatml(m) for m in convs[:4]] + ["The sky is above. There are many colors."]
    p = DemoModelParams(vocab_size=400, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, pretrain_steps=30, pretrain_batch=8)
    model, tokenizer, _ = build_tiny_model(texts, p, seed=0, progress=False)
    model.save_pretrained(folder, safe_serialization=True)
    save_portable_tokenizer(tokenizer, folder)
    (folder / "manifest.json").write_text(json.dumps({"source": "demo"}))
