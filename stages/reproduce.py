"""reproduce: can a registered model version be rebuilt from git, its MLflow run and the DVC remote?

  tunepipe reproduce MODEL@ALIAS | MODEL/VERSION [--into DIR] [--rerun [STAGE]]

Run it in a checkout of the project. The tracking store is MLFLOW_TRACKING_URI, else
register.tracking_uri of ./params.yaml. register tagged the version with the git commit it ran at
(git_commit) and DVC's md5 of every out in dvc.lock (dvc_lock.<path>). This command:
1. makes a git worktree at that commit (`git worktree add --detach`; DIR is --into, else a new
   temporary folder);
2. puts there what the version's MLflow run logged and the commit may not hold: dvc.lock,
   params.yaml, metrics/ and plots/ (register runs before its results are committed, and a
   `dvc exp run` registers from params that are not committed at all);
3. `dvc pull`s from this checkout's default DVC remote;
4. checks that `dvc status` finds nothing that would rerun (register, review and upload aside: they ran
   after the hashes were taken), and that every out's md5 in dvc.lock and of its pulled files
   equals the version's tag.
It prints the verdict in one line, naming every out that differs; exit status 0 when reproducible.
5. with --rerun: `dvc repro --force STAGE` (default eval: the whole chain up to the scores) in the
   worktree, with this checkout's environments (.venvs linked there), then compares the md5 of every
   out the rerun rewrote with the version's tag (a metrics file: its content apart from MEASURED, the
   timings and memory of the run) and, when eval reran, every score with the registered
   metrics/eval.json: a second verdict line, exit status 0 only when all are equal. CPU runs repeat
   bit for bit on one processor type (README: CPU math pin); a GPU run, or another processor, gives
   other bits, and the line names each out and score that moved.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages.common import StageError
from stages.dvc_hashes import dvc_md5
from stages.promotion import eval_scores

MEASURED = {"runtime_s", "tokens_per_s", "peak_memory_mb", "resumed_from_step"}  # of the run, not its result
AFTER_REGISTER = ("register", "review", "upload")  # their outs (record, report, receipt) come after the version's hashes
LOGGED = ["dvc.lock", "params.yaml", "metrics", "plots"]  # run artifacts put into the worktree


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="MODEL@ALIAS|MODEL/VERSION", help="e.g. tunepipe-demo@champion or tunepipe-demo/3")
    parser.add_argument("--into", type=Path, default=None, help="folder for the git worktree (default: a new temporary one)")
    parser.add_argument("--rerun", nargs="?", const="eval", default=None, metavar="STAGE",
                        help="then rerun the pipeline there up to STAGE (default eval) and compare hashes and scores")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """(model, alias, version number) of MODEL@ALIAS or MODEL/VERSION."""
    name, at, alias = spec.partition("@")
    if at and name and alias:
        return name, alias, None
    name, slash, number = spec.rpartition("/")
    if at or not slash or not name or not number.isdigit():
        raise StageError(f"{spec}: expected MODEL@ALIAS or MODEL/VERSION (e.g. tunepipe-demo@champion)")
    return name, None, number


def find_version(client, spec: str):
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_spec(spec)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        raise StageError(f"{spec}: no such registered model version in {tracking_uri()}") from None


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").exists() else {}
    return ((params or {}).get("register") or {}).get("tracking_uri", "sqlite:///mlflow.db")


def registered_hashes(client, version) -> dict[str, str]:
    """{out path: md5} the version was registered with (older versions: its run's tags)."""
    tags = version.tags if any(k.startswith("dvc_lock.") for k in version.tags) else client.get_run(version.run_id).data.tags
    return {k.removeprefix("dvc_lock."): v for k, v in tags.items() if k.startswith("dvc_lock.")}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def make_worktree(commit: str, into: Path | None, name: str) -> Path:
    top = run(["git", "rev-parse", "--show-toplevel"], Path.cwd())
    if top.returncode != 0:
        raise StageError(f"{Path.cwd()}: not a git checkout of the project (run reproduce in one)")
    folder = into or Path(tempfile.mkdtemp(prefix=f"tunepipe-reproduce-{name}-"))
    if folder.exists() and any(folder.iterdir()):
        raise StageError(f"{folder}: exists and is not empty (pick another --into)")
    added = run(["git", "worktree", "add", "--detach", str(folder), commit], Path(top.stdout.strip()))
    if added.returncode != 0:
        raise StageError(f"git worktree add {folder} {commit}: {last_line(added)}")
    return folder


def restore_logged(run_id: str, folder: Path) -> list[str]:
    """The run's dvc.lock, params.yaml, metrics/ and plots/ into the worktree; which of them the commit lacked or differs in."""
    import mlflow
    from mlflow.exceptions import MlflowException

    changed = []
    for item in LOGGED:
        before = snapshot(folder / item)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=item, dst_path=tmp))
                if got.is_dir():
                    shutil.copytree(got, folder / item, dirs_exist_ok=True)
                else:
                    (folder / item).write_bytes(got.read_bytes())
        except MlflowException:
            continue
        if snapshot(folder / item) != before:
            changed.append(item)
    return changed


def snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in path.rglob("*") if f.is_file()} if path.is_dir() else {}


def use_source_remote(folder: Path, dvc: str) -> str:
    """Point the worktree at this checkout's default remote (a local folder remote's relative path in
    .dvc/config would otherwise resolve from the worktree): written to the worktree's .dvc/config.local."""
    from dvc.repo import Repo

    repo = Repo(os.getcwd())
    try:
        config = repo.config
        name = config["core"].get("remote")
        if not name:
            raise StageError(f"{Path.cwd()}/.dvc/config: no default DVC remote (./setup.sh adds one; or `dvc remote add -d`)")
        url = str(config["remote"][name]["url"])
    finally:
        repo.close()
    local = Path(os.getcwd(), ".dvc", "config.local")
    if local.exists():  # credentials of the remote live there
        (folder / ".dvc" / "config.local").write_bytes(local.read_bytes())
    added = run([dvc, "remote", "add", "--local", "--force", "--default", name, url], folder)
    if added.returncode != 0:
        raise StageError(f"dvc remote add --local {name} {url}: {last_line(added)}")
    return url


def pipeline_changes(folder: Path, dvc: str) -> list[str]:
    """What `dvc status` says would rerun, register, review and upload aside."""
    status = run([dvc, "status", "--json"], folder)
    if status.returncode != 0:
        return [f"dvc status failed: {last_line(status)}"]
    found = []
    for stage, changes in json.loads(status.stdout or "{}").items():
        if stage.rpartition(":")[2] in AFTER_REGISTER:
            continue
        for change in changes:
            if isinstance(change, dict):
                found += [f"{stage}: {kind} {', '.join(f'{p} ({s})' for p, s in what.items())}"
                          for kind, what in change.items()]
            else:
                found.append(f"{stage}: {change}")
    return found


def hash_mismatches(folder: Path, hashes: dict[str, str]) -> list[str]:
    """Every out whose md5 in the worktree's dvc.lock, or of its files, is not the version's."""
    lock = yaml.safe_load((folder / "dvc.lock").read_text()) if (folder / "dvc.lock").exists() else {}
    stages = (lock or {}).get("stages") or {}
    skip = {o["path"] for s in AFTER_REGISTER for o in (stages.get(s) or {}).get("outs", [])}
    locked = {o["path"]: o.get("md5", "") for s in stages.values() for o in s.get("outs", [])}
    problems = []
    for path, md5 in sorted(hashes.items()):
        if path in skip:
            continue
        if locked.get(path) != md5:
            problems.append(f"{path}: dvc.lock records {locked.get(path) or 'nothing'}, the version {md5}")
        elif not (folder / path).exists():
            problems.append(f"{path}: missing after dvc pull (md5 {md5})")
        elif (actual := dvc_md5(folder / path)) != md5:
            problems.append(f"{path}: the pulled files hash to {actual}, the version was registered with {md5}")
    return problems


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def reproduce(args: argparse.Namespace) -> int:
    import mlflow
    from mlflow import MlflowClient

    parse_spec(args.spec)  # a typo fails before any store is opened
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    version = find_version(client, args.spec)
    label = f"{version.name}/{version.version}"
    commit = version.tags.get("git_commit", "")
    hashes = registered_hashes(client, version)
    if not commit or commit == "unknown" or not hashes:
        raise StageError(f"{label} has no git_commit or dvc_lock.* tags: it was not registered by the register stage")
    dvc = str(Path(sys.executable).with_name("dvc"))
    folder = make_worktree(commit, args.into, f"{version.name}-v{version.version}")
    print(f"reproduce: {label} (run {version.run_id}) at commit {commit[:12]} in {folder}")
    restored = restore_logged(version.run_id, folder)
    if restored:
        print(f"reproduce: from the run, as registered (the commit has other or none): {', '.join(restored)}")
    url = use_source_remote(folder, dvc)
    pulled = run([dvc, "pull"], folder)
    print(f"reproduce: dvc pull from {url}: " + ("ok" if pulled.returncode == 0 else f"failed: {last_line(pulled)}"))
    problems = hash_mismatches(folder, hashes) + pipeline_changes(folder, dvc)
    if problems:
        print(f"NOT reproducible: {label}: {'; '.join(problems)}")
    else:
        print(f"reproducible: {label}: every hash matches ({len(hashes)} outs) and dvc status finds nothing to rerun")
    if args.rerun is None:
        return 1 if problems else 0
    return 1 if rerun(folder, dvc, args.rerun, hashes, label) or problems else 0


def rerun(folder: Path, dvc: str, stage: str, hashes: dict[str, str], label: str) -> list[str]:
    """`dvc repro --force STAGE` in the worktree; what differs from the registered version (printed)."""
    registered_scores = flat_scores(folder / "metrics/eval.json")
    registered_metrics = {f"metrics/{f.name}": f.read_text() for f in sorted((folder / "metrics").glob("*.json"))}
    venvs = folder / ".venvs"
    if not venvs.exists() and Path(".venvs").is_dir():  # dvc.yaml's commands run .venvs/<env>/bin/python
        venvs.symlink_to(Path(".venvs").resolve(), target_is_directory=True)
    dag = run([dvc, "dag", "--dot", stage], folder)
    if dag.returncode != 0:
        raise StageError(f"dvc dag {stage}: {last_line(dag)}")
    stages = {line.strip().rstrip(";").strip('"') for line in dag.stdout.splitlines()
              if line.strip().startswith('"') and "->" not in line}  # the dot's node lines: "name";
    print(f"reproduce: dvc repro --force {stage} ({len(stages)} stages) in {folder}", flush=True)
    if subprocess.run([dvc, "repro", "--force", stage], cwd=folder).returncode != 0:
        raise StageError(f"dvc repro --force {stage} failed in {folder}: its output is above")
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]
    rewritten = {o["path"]: o.get("md5", "") for name in stages for o in (lock.get(name) or {}).get("outs", [])}
    differ = [f"{path} (registered {hashes.get(path, 'nothing')}, rerun {md5})" for path, md5 in sorted(rewritten.items())
              if hashes.get(path) != md5 and not same_results(registered_metrics.get(path), folder / path)]
    if "eval" in stages and registered_scores:
        differ += score_changes(registered_scores, flat_scores(folder / "metrics/eval.json"))
    what = f"{len(rewritten)} outs" + (f", {len(registered_scores)} scores" if "eval" in stages and registered_scores else "")
    if differ:
        print(f"rerun differs: {label} up to {stage}: {'; '.join(differ)}")
    else:
        print(f"rerun equal: {label} up to {stage}: every rerun out and score equals the registered one ({what})")
    return differ


def same_results(registered: str | None, rerun: Path) -> bool:
    """A metrics JSON equal to the registered one but for MEASURED (timings, memory: never the same twice)."""
    if registered is None or rerun.suffix != ".json" or not rerun.is_file():
        return False
    def results(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k not in MEASURED}
    return results(json.loads(registered)) == results(json.loads(rerun.read_text()))


def score_changes(registered: dict[str, float], rerun: dict[str, float]) -> list[str]:
    """Every score that is not exactly the registered one, as "set.model.metric registered -> rerun"."""
    return [f"{key} {registered.get(key)} -> {rerun.get(key)}"
            for key in sorted(set(registered) | set(rerun)) if registered.get(key) != rerun.get(key)]


def flat_scores(path: Path) -> dict[str, float]:
    """{"set.model.metric": score} of an eval.json, {} when there is none."""
    return dict(eval_scores(json.loads(path.read_text()))) if path.exists() else {}
