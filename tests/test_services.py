"""The shared servers of `tunepipe services` (stages/services.py): register against `mlflow server` on
PostgreSQL with moto's S3 server as artifact store, `tunepipe reproduce` through a DVC S3 remote on
that server, and three queued experiments (`dvc queue start -j 2`) logging to the one tracking server.

The module starts the servers itself through the command (`tunepipe services start`) and stops them.
It skips only when PostgreSQL's server programs are absent (./setup.sh installs them as root).
The project checkout is test_reproduce's: the pipeline fixture's outputs committed with `dvc commit`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_stage
from stages.common import StageError
from stages.services import DVC_BUCKET, MLFLOW_BUCKET, postgres_bin
from test_reproduce import DVC, project_clone, reproduce, sh


def services(action: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", "services", action, "--dir", str(folder)],
                          cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The environment `source .services/env.sh` gives, while the three servers run."""
    try:
        postgres_bin()
    except StageError as e:
        pytest.skip(f"no PostgreSQL server programs: {e}")
    folder = tmp_path_factory.mktemp("services")
    started = services("start", folder)
    cluster = Path(json.loads((folder / "state.json").read_text())["postgres"]["cluster"]) if started.returncode == 0 else None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert services("status", folder).stdout.strip() == "s3: up, postgres: up, mlflow: up"
        env = dict(line.removeprefix("export ").split("=", 1)
                   for line in (folder / "env.sh").read_text().splitlines() if line.startswith("export "))
        yield {**env, "state": json.loads((folder / "state.json").read_text())}
    finally:
        stopped = services("stop", folder)
        assert stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr
    assert services("status", folder).returncode == 1  # not running
    assert cluster is None or not cluster.exists()  # stop removed the PostgreSQL cluster


def s3_keys(servers: dict, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=servers["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def postgres_rows(servers: dict, sql: str) -> list[tuple]:
    import psycopg2

    pg = servers["state"]["postgres"]
    with psycopg2.connect(host="127.0.0.1", port=pg["port"], user="tunepipe", dbname="mlflow") as conn:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()


@pytest.fixture(scope="module")
def origin(pipeline, servers, tmp_path_factory):
    """The project checkout with the S3 remote as its default, version 1 registered on the server."""
    root = tmp_path_factory.mktemp("s3project")
    origin = project_clone(pipeline, root)
    sh(origin, DVC, "remote", "add", "-d", "s3", f"s3://{DVC_BUCKET}/tunepipe")
    sh(origin, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "the S3 remote")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.items():
            if key != "state":
                mp.setenv(key, value)
        run_stage(origin, "register")
    return origin


@pytest.fixture
def server_env(servers, monkeypatch) -> dict:
    for key, value in servers.items():
        if key != "state":
            monkeypatch.setenv(key, value)
    # `dvc queue start` spawns its workers as `dvc` found on PATH: the core env's, as when it is activated
    monkeypatch.setenv("PATH", f"{Path(DVC).parent}{os.pathsep}{os.environ['PATH']}")
    return {**os.environ}


def test_register_writes_runs_to_postgres_and_artifacts_to_s3(origin, servers, server_env):
    record = json.loads((origin / "registry/record.json").read_text())
    assert (record["version"], record["gate"]) == (1, "pass")
    assert record["tracking_uri"] == servers["MLFLOW_TRACKING_URI"]
    # the backend store is PostgreSQL: the run and the version are rows there
    assert postgres_rows(servers, "select name, version from model_versions") == [("tunepipe-demo", 1)]
    assert postgres_rows(servers, f"select status from runs where run_uuid = '{record['run_id']}'") == [("FINISHED",)]
    # the artifacts are objects in the S3 bucket: the run's files under its id, the logged model's
    # (adapter and MLmodel) under the model's id (MLflow 3 keeps logged models beside runs)
    keys = s3_keys(servers, MLFLOW_BUCKET)
    assert any(record["run_id"] in key and key.endswith("/dvc.lock") for key in keys), keys
    model = [key for key in keys if re.fullmatch(r"artifacts/\d+/models/m-[0-9a-f]+/artifacts/.+", key)]
    assert any(key.endswith("/artifacts/adapter/adapter_model.safetensors") for key in model), keys
    assert any(key.endswith("/MLmodel") for key in model), keys


def test_reproduce_pulls_through_the_s3_remote(origin, servers, server_env, tmp_path):
    sh(origin, DVC, "push", "-q", env=server_env)
    stored = s3_keys(servers, DVC_BUCKET)
    assert stored and all(key.startswith("tunepipe/files/md5/") for key in stored)
    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(fresh))
    result = reproduce(fresh, tmp_path / "check", servers["MLFLOW_TRACKING_URI"])
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("reproducible: tunepipe-demo/1: every hash matches"), verdict
    # nothing came from a folder remote: the clone's default remote is the S3 one
    assert sh(fresh, DVC, "remote", "default").stdout.strip() == "s3"


def wait_for_queue(origin: Path, env: dict, timeout: float = 1200) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sh(origin, DVC, "queue", "status", env=env).stdout
        if not any(word in out for word in ("Queued", "Running")):
            return out
        time.sleep(10)
    logs = "".join(path.read_text()[-1500:] for path in (origin / ".dvc/tmp/exps/celery").glob("*.out"))
    pytest.fail(f"the queue did not finish within {timeout:.0f} s:\n{out}\n{logs}")


def test_three_queued_experiments_give_three_complete_runs(origin, servers, server_env):
    import mlflow

    client = mlflow.MlflowClient(servers["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tunepipe")
    before = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    # queued runs work in git copies under .dvc/tmp/exps, which hold only git's files: the environments
    # reach them through a committed symlink (dvc.yaml runs .venvs/<env>/bin/python)
    (origin / ".venvs").symlink_to(REPO / ".venvs")
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "add", "-f", ".venvs")
    sh(origin, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "registered; environments linked")
    for n in (1, 2, 3):  # a param only register reads: the queued runs rerun register alone
        sh(origin, DVC, "exp", "run", "--queue", "-S", f"register.sample_generations={n}", "register", env=server_env)
    sh(origin, DVC, "queue", "start", "-j", "2", env=server_env)
    status = wait_for_queue(origin, server_env)
    assert status.count("Success") == 3, status

    runs = [run for run in client.search_runs([experiment.experiment_id]) if run.info.run_id not in before]
    assert sorted(run.data.params.get("register.sample_generations") for run in runs) == ["1", "2", "3"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    experiments = set(sh(origin, DVC, "exp", "list", "--name-only", env=server_env).stdout.split())
    names = {run.info.run_name for run in runs}  # register names the run after DVC_EXP_NAME
    assert len(names) == 3 and names <= experiments, (names, experiments)
    versions = client.search_model_versions("name = 'tunepipe-demo'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert {v.tags.get("registration") for v in versions} == {"complete"}
    assert {v.run_id for v in versions} == before | {run.info.run_id for run in runs}
    assert postgres_rows(servers, "select count(*) from runs where status = 'FINISHED'") == [(4,)]
