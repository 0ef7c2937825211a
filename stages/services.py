"""`tunepipe services start|stop|status`: a team's shared servers on this machine, on 127.0.0.1.

- an S3 server: moto's (`moto_server`), with the buckets `tunepipe-mlflow` (MLflow's artifacts) and
  `tunepipe-dvc` (a DVC remote); it keeps objects in memory, so `stop` discards them;
- PostgreSQL from the system's packages (`initdb`, `pg_ctl`), a fresh cluster in a temporary folder,
  run as a non-root user when we are root (postgres refuses root): the `postgres` user, else `nobody`;
- `mlflow server` with that PostgreSQL as backend store and the S3 bucket as artifact store
  (`--artifacts-destination s3://tunepipe-mlflow/artifacts`; clients upload through the server).

Each gets a free port. `start` writes `<dir>/env.sh` to `source`: MLFLOW_TRACKING_URI,
MLFLOW_S3_ENDPOINT_URL and AWS_ENDPOINT_URL (read by MLflow, boto3 and DVC's S3 remote) and moto's
dummy AWS credentials. `stop` stops all three and removes the PostgreSQL cluster.
State (ports, pids, logs) lives in `<dir>` (default `.services`).
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from stages.common import StageError

MLFLOW_BUCKET = "tunepipe-mlflow"
DVC_BUCKET = "tunepipe-dvc"
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BIN = Path(sys.executable).parent  # moto_server and mlflow live beside this python (the core env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    raise StageError("PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql "
                     "(./setup.sh does it when run as root)")


def postgres_user() -> pwd.struct_passwd | None:
    """Who runs postgres: we ourselves, unless we are root (which postgres refuses)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise StageError("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def as_user(user: pwd.struct_passwd | None) -> dict:
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def wait_until(url: str, what: str, log: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until url answers 200; a server that exits or never answers stops us naming its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StageError(f"{what} exited with code {proc.returncode} while starting: see {log}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise StageError(f"{what} did not answer {url} within {timeout:.0f} s: see {log}")


def spawn(cmd: list[str], log: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A server in its own session (it outlives this command; stop signals its process group)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, **kwargs)


def start_s3(folder: Path, state: dict) -> str:
    port = free_port()
    log = folder / "s3.log"
    proc = spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    state["s3"] = {"pid": proc.pid, "port": port, "log": str(log)}
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(endpoint + "/moto-api/", "moto's S3 server", log, proc)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in DUMMY_AWS.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
        s3.create_bucket(Bucket=bucket)
    return endpoint


def start_postgres(folder: Path, state: dict) -> str:
    bindir, user = postgres_bin(), postgres_user()
    cluster = Path(tempfile.mkdtemp(prefix="tunepipe-postgres-"))  # /tmp: reachable by the postgres user
    if user is not None:
        os.chown(cluster, user.pw_uid, user.pw_gid)
    port = free_port()
    state["postgres"] = {"port": port, "cluster": str(cluster), "bin": str(bindir),
                         "user": user.pw_name if user else None, "log": str(cluster / "postgres.log")}
    run = dict(capture_output=True, text=True, cwd=cluster, **as_user(user))
    init = subprocess.run([str(bindir / "initdb"), "-D", str(cluster / "data"), "-U", "tunepipe",
                           "--auth=trust", "-E", "UTF8", "--no-locale"], **run)
    if init.returncode:
        raise StageError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {cluster}"
    started = subprocess.run([str(bindir / "pg_ctl"), "start", "-w", "-t", "120", "-D", str(cluster / "data"),
                              "-l", str(cluster / "postgres.log"), "-o", options], start_new_session=True, **run)
    if started.returncode:
        raise StageError(f"PostgreSQL did not start: see {cluster / 'postgres.log'}")
    created = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tunepipe", "mlflow"],
                             **run)
    if created.returncode:
        raise StageError(f"createdb mlflow failed: {created.stderr.strip()}")
    return f"postgresql+psycopg2://tunepipe@127.0.0.1:{port}/mlflow"


def start_mlflow(folder: Path, state: dict, backend: str, s3_endpoint: str) -> str:
    port = free_port()
    log = folder / "mlflow.log"
    # no job runner: its worker processes (for GenAI scorers) take ~1 GB and tunepipe schedules no jobs
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **DUMMY_AWS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    proc = spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
                  "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, env=env)
    state["mlflow"] = {"pid": proc.pid, "port": port, "log": str(log), "backend": backend}
    uri = f"http://127.0.0.1:{port}"
    wait_until(uri + "/health", "mlflow server", log, proc, timeout=300)
    return uri


def env_lines(state: dict) -> list[str]:
    s3 = f"http://127.0.0.1:{state['s3']['port']}"
    values = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow']['port']}", "MLFLOW_S3_ENDPOINT_URL": s3,
              "AWS_ENDPOINT_URL": s3, **DUMMY_AWS}
    return [f"export {key}={value}" for key, value in values.items()]


def start(folder: Path) -> dict:
    if (folder / "state.json").exists():
        raise StageError(f"{folder}/state.json exists: the services are running (or were not stopped); "
                         f"run `tunepipe services stop --dir {folder}` first")
    folder.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    try:
        s3 = start_s3(folder, state)
        backend = start_postgres(folder, state)
        start_mlflow(folder, state, backend, s3)
    except BaseException:
        stop_all(state)
        raise
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    (folder / "env.sh").write_text("# source me: the shared servers `tunepipe services start` runs\n"
                                   + "\n".join(env_lines(state)) + "\n")
    return state


def stop_group(pid: int, timeout: float = 30) -> None:
    """SIGTERM to the server's process group (mlflow's workers with it), SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        reap(pid)
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def reap(pid: int) -> None:
    try:  # a child of this process (start and stop in one process, as in the tests) must be waited for
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_postgres(pg: dict) -> None:
    user = pwd.getpwnam(pg["user"]) if pg.get("user") else None
    data = Path(pg["cluster"]) / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run([str(Path(pg["bin"]) / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)],
                       capture_output=True, **as_user(user))
    shutil.rmtree(pg["cluster"], ignore_errors=True)


def stop_all(state: dict) -> None:
    if "mlflow" in state:
        stop_group(state["mlflow"]["pid"])
    if "postgres" in state:
        stop_postgres(state["postgres"])
    if "s3" in state:
        stop_group(state["s3"]["pid"])


def stop(folder: Path) -> bool:
    """Stop what `start` started in folder; False when nothing was running."""
    path = folder / "state.json"
    if not path.exists():
        return False
    stop_all(json.loads(path.read_text()))
    path.unlink()
    (folder / "env.sh").unlink(missing_ok=True)
    return True


def status(folder: Path) -> dict[str, bool]:
    """Which servers answer: s3, postgres, mlflow (empty when none was started)."""
    path = folder / "state.json"
    if not path.exists():
        return {}
    state = json.loads(path.read_text())

    def answers(url: str) -> bool:
        try:
            return requests.get(url, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    pg = state["postgres"]
    ready = subprocess.run([str(Path(pg["bin"]) / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg["port"])],
                           capture_output=True)
    return {"s3": answers(f"http://127.0.0.1:{state['s3']['port']}/moto-api/"), "postgres": ready.returncode == 0,
            "mlflow": answers(f"http://127.0.0.1:{state['mlflow']['port']}/health")}


def run_services(action: str, folder: Path) -> int:
    """The command's body: one line per outcome, exit 1 on a StageError or a server that does not answer."""
    try:
        if action == "start":
            state = start(folder)
            print(f"started: s3 :{state['s3']['port']}, postgres :{state['postgres']['port']}, "
                  f"mlflow :{state['mlflow']['port']}; now: source {folder / 'env.sh'}")
        elif action == "stop":
            print("stopped" if stop(folder) else f"nothing to stop in {folder}")
        else:
            answers = status(folder)
            if not answers:
                print(f"not running (no {folder / 'state.json'})")
                return 1
            print(", ".join(f"{name}: {'up' if up else 'DOWN'}" for name, up in answers.items()))
            return 0 if all(answers.values()) else 1
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
