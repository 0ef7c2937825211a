"""register against a real `mlflow server` on 127.0.0.1 that is down, or is killed halfway through a
registration: one clear line naming the URI (password redacted), no version left unfinished after
the rerun, and exactly one version registered."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_register_upload import prepare

# MLflow retries a refused connection for minutes by default; a test wants the failure now
FAST_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 with its backend and artifacts in `store`, once /health answers."""
    import requests

    store.mkdir(exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(store / "server.log", "ab"), start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # its job runner spins a core; no jobs here
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        except requests.RequestException:
            pass
        if server.poll() is not None:
            break
        time.sleep(1)
    kill(server)
    pytest.fail(f"mlflow server did not start: {(store / 'server.log').read_text()[-2000:]}")


def kill(server: subprocess.Popen) -> None:
    """SIGKILL the server and its workers (its own process group, started above)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def register(folder: Path, uri: str, kill_before: str = "", server_pid: int = 0) -> subprocess.CompletedProcess:
    """The register stage in its own process, as `dvc repro` runs it. kill_before: a MlflowClient method
    that first SIGKILLs the server's process group (the server stops halfway through the registration)."""
    code = "import sys; sys.argv = ['register']\n"
    if kill_before:
        code += (f"import os, signal\nfrom mlflow import MlflowClient\nreal = MlflowClient.{kill_before}\n"
                 f"def dying(*a, **k):\n    os.killpg({server_pid}, signal.SIGKILL)\n    return real(*a, **k)\n"
                 f"MlflowClient.{kill_before} = dying\n")
    code += "from stages import common, register; common.run_stage(register.main)\n"
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, **FAST_FAILURE, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)})


def test_an_unreachable_server_fails_in_one_line_naming_the_uri_without_its_password(pipeline, workdir, monkeypatch):
    prepare(pipeline, workdir, monkeypatch)
    port = free_port()  # nothing listens there
    result = register(workdir, f"http://tunepipe:s3cret-pw@127.0.0.1:{port}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: MLflow tracking server http://tunepipe:***@127.0.0.1:{port} is unreachable (")
    assert lines[0].endswith("): nothing was registered")
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert not (workdir / "registry/record.json").exists()


# kill points: before the version is created (mlflow.register_model calls MlflowClient._create_model_version),
# and after it, before its aliases
@pytest.mark.parametrize("kill_before", ["_create_model_version", "set_registered_model_alias"])
def test_a_server_killed_halfway_leaves_nothing_unfinished_and_the_rerun_registers_once(
        pipeline, workdir, monkeypatch, tmp_path_factory, kill_before):
    from mlflow import MlflowClient

    prepare(pipeline, workdir, monkeypatch)
    store, port = tmp_path_factory.mktemp("server"), free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    try:
        failed = register(workdir, uri, kill_before, server.pid)
    finally:
        kill(server)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: MLflow tracking server {uri} failed during registration (")
    assert error.endswith("rerun register when it answers (an interrupted registration is completed, not duplicated)")
    assert not (workdir / "registry/record.json").exists()

    server = start_server(store, port)  # back, with the same store
    try:
        rerun = register(workdir, uri)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(tracking_uri=uri)
        versions = client.search_model_versions("name = 'tunepipe-demo'")
        assert [v.version for v in versions] == ["1"]
        version = client.get_model_version("tunepipe-demo", "1")
        assert version.tags["registration"] == "complete" and version.tags["gate.decision"] == "pass"
        assert sorted(version.aliases) == ["candidate", "champion"]
        completing = "completing version 1, left unfinished by an interrupted registration"
        assert (completing in rerun.stdout) == (kill_before == "set_registered_model_alias")
        record = json.loads((workdir / "registry/record.json").read_text())
        assert (record["version"], record["run_id"]) == (1, version.run_id)
    finally:
        kill(server)
