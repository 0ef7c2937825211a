"""Fault injection: SIGKILL a stage at a seeded random moment under `dvc repro`, rerun `dvc repro`,
and check that nothing is corrupt, nothing temporary is left and the outputs equal an unkilled run.

TUNEPIPE_FAULTS=short (default, CI; a few kills, within 5 minutes) | long (every stage, at least 5
moments each: by hand, an hour or more) | off. TUNEPIPE_FAULTS_SEED picks the moments (default 0);
TUNEPIPE_FAULTS_STAGES=train,dpo,... kills only those stages (a long run in parts).
Each kill: `dvc repro --force --single-item STAGE` in a fresh checkout that ran the pipeline once,
the stage's own process killed (as the OOM killer does) a random share of its unkilled run time in,
then a plain `dvc repro` (every other kill, the first included, with --no-run-cache, so the stage really runs again
rather than DVC restoring its outs from the run-cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST_PARAMS, REPO, deep_update

MODE = os.environ.get("TUNEPIPE_FAULTS", "short")
SEED = int(os.environ.get("TUNEPIPE_FAULTS_SEED", "0"))
ALL_STAGES = ["demo_data", "ingest", "clean", "split", "base", "cpt", "train", "dpo", "merge", "turbomind", "eval",
              "register", "review", "upload"]
PLAN = {"short": {"stages": ["ingest", "clean", "split", "base"], "moments": 1},
        "long": {"stages": ALL_STAGES, "moments": 5}}
if os.environ.get("TUNEPIPE_FAULTS_STAGES") and MODE in PLAN:
    PLAN[MODE]["stages"] = [s for s in ALL_STAGES if s in os.environ["TUNEPIPE_FAULTS_STAGES"].split(",")]
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-")  # stages/common.py atomic_path's temporaries
DVC = ".venvs/core/bin/dvc"



def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True, timeout=3600)
    assert not check or result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def fresh_checkout(root: Path) -> Path:
    """The repo's files (as git would commit them) in a new git repo at root, with FAST_PARAMS."""
    envs = {"core", "lmdeploy", "opencompass"} if MODE == "long" else {"core"}
    missing = [e for e in sorted(envs) if not (REPO / ".venvs" / e / "bin/python").exists()]
    if missing:
        pytest.skip(f"environments missing: {missing}; run ./setup.sh")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("metrics/", "plots/", "registry/", "upload/")) \
                and rel != "dvc.lock":
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / ".venvs").symlink_to(REPO / ".venvs")
    params = deep_update(yaml.safe_load((root / "params.yaml").read_text()), FAST_PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
    return root


def stage_process(parent: int, stage: str) -> int | None:
    """The pid of `python -m stages.<stage>` among parent's descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv and f"stages.{stage}".encode() in argv:
            return pid
        todo += children.get(pid, [])
    return None


def run_stage(root: Path, stage: str, kill_after: float | None = None, force: bool = True) -> tuple[float, bool]:
    """`dvc repro [--force] --single-item stage`; SIGKILL the stage's process kill_after seconds after it
    started. Returns (how long the stage's process lived, whether it was killed)."""
    cmd = [DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    # a file, not a pipe: nothing reads it while this polls, and a full pipe would block the stage
    log = tempfile.TemporaryFile(mode="w+")
    dvc_run = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True)
    pid, started, killed = None, None, False
    while dvc_run.poll() is None:
        if pid is None:
            pid = stage_process(dvc_run.pid, stage)
            started = time.monotonic() if pid else None
        elif kill_after is not None and time.monotonic() - started >= kill_after:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
            break
        elif not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.01)
    dvc_run.wait(timeout=3600)
    log.seek(0)
    output = log.read()
    log.close()
    lived = time.monotonic() - started if started else 0.0
    if not killed:
        assert dvc_run.returncode == 0, f"dvc repro {stage} failed unkilled:\n{output[-3000:]}"
    return lived, killed


def uncached(root: Path) -> set[str]:
    """Outs, metrics and plots dvc.yaml marks cache: false (run ids, timings: not compared)."""
    found = set()
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            if isinstance(entry, dict):
                found |= {path for path, opts in entry.items() if isinstance(opts, dict) and opts.get("cache") is False}
    return found


def cached_outs(root: Path) -> dict[str, str]:
    """{out path: md5} of the cached outs in dvc.lock."""
    skip = uncached(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out.get("md5") for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"] not in skip}


def check_cache(root: Path) -> int:
    """Every file in DVC's cache hashes to its name (a .dir listing is JSON); returns the count."""
    n = 0
    for path in (root / ".dvc/cache/files/md5").rglob("*"):
        if path.is_file():
            name = path.parent.name + path.name
            if name.endswith(".dir"):
                json.loads(path.read_bytes())
            else:
                assert hashlib.md5(path.read_bytes()).hexdigest() == name, f"corrupt cache file {path}"
            n += 1
    return n


def check_models_load(root: Path) -> None:
    from safetensors import safe_open

    for folder in ["models/base", "models/adapter", "models/merged", "models/turbomind"]:
        if (root / folder).is_dir():
            for config in (root / folder).glob("*config.json"):
                json.loads(config.read_text())
            for weights in (root / folder).glob("*.safetensors"):
                with safe_open(str(weights), "np") as f:
                    assert list(f.keys()), f"{weights}: no tensors"


def temporaries(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d in {".git", ".dvc", ".venvs"})]
        found += [str(Path(folder, n).relative_to(root)) for n in dirs + files if TEMP_NAME.match(n)]
    return found


KILLED_WRITER = """
import os, signal, sys
from stages.common import atomic_path
with atomic_path(sys.argv[1], is_dir=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"half")
    print(tmp.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_no_temporary(tmp_path):
    """The reaper removes the temporary of a SIGKILLed writer; nothing replaces the old out."""
    out = tmp_path / "models" / "merged"
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"old")
    result = subprocess.run([str(REPO / ".venvs/core/bin/python"), "-c", KILLED_WRITER, str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL and TEMP_NAME.match(result.stdout.strip())
    for _ in range(200):  # the reaper notices the death within milliseconds
        if sorted(p.name for p in out.parent.iterdir()) == ["merged"]:
            break
        time.sleep(0.01)
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    assert (out / "weights.bin").read_bytes() == b"old"


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    from stages.common import write_json

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    stale = tmp_path / f".record.json.tmp-{gone.pid}-abcd1234"
    stale.mkdir()
    live = tmp_path / f".record.json.tmp-{os.getpid()}-efgh5678"  # this process: alive, kept
    live.mkdir()
    write_json(tmp_path / "record.json", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "record.json"]


@pytest.mark.faults
@pytest.mark.skipif(MODE not in PLAN, reason=f"TUNEPIPE_FAULTS={MODE}: fault injection off")
def test_killed_stages_recover(tmp_path):
    plan = PLAN[MODE]
    root = fresh_checkout(tmp_path / "checkout")
    last = plan["stages"][-1]
    stages = ALL_STAGES[:ALL_STAGES.index(last) + 1]
    lifetime = {s: run_stage(root, s, force=False)[0] for s in stages}  # the unkilled run, stage by stage
    reference = cached_outs(root)
    rng = random.Random(SEED)
    survived, trials = 0, []
    for stage in plan["stages"]:
        for moment in range(plan["moments"]):
            share = rng.uniform(0.05, 0.95)
            for attempt in range(4):  # a kill that came too late (the stage had finished) is tried earlier
                _, killed = run_stage(root, stage, kill_after=share * lifetime[stage])
                if killed:
                    break
                share /= 2
            assert killed, f"{stage}: never caught alive to kill"
            no_run_cache = [] if len(trials) % 2 else ["--no-run-cache"]
            dvc(root, "repro", *no_run_cache, *stages)  # every stage up to the last killed one (base needs no split)
            assert cached_outs(root) == reference, f"{stage} killed at {share:.2f}: outputs differ from the unkilled run"
            status = dvc(root, "status", *stages).stdout
            assert "up to date" in status, f"{stage} killed at {share:.2f}: dvc status:\n{status}"
            assert temporaries(root) == [], f"{stage} killed at {share:.2f}: temporaries left"
            check_cache(root)
            check_models_load(root)
            survived += 1
            trials.append(f"{stage}@{share:.2f}{'(no run-cache)' if no_run_cache else ''}")
            print(f"faults: {survived} survived, last {trials[-1]}", flush=True)  # progress of a long run (-s)
    print(f"\nfaults ({MODE}, seed {SEED}): {survived} kills survived: {', '.join(trials)}")
    assert survived == len(plan["stages"]) * plan["moments"]
