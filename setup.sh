#!/usr/bin/env bash
# One idempotent set-up for tunepipe. Creates one virtual environment per tool family, because
# the named tools' pins do not co-install (README.md, Environments):
#   .venvs/core         dvc, mlflow, transformers, peft, datasets, openpyxl: drives `dvc repro`
#   .venvs/xtuner       xtuner 0.2 (train.backend=xtuner)
#   .venvs/lmdeploy     lmdeploy's AWQ quantizer (turbomind stage)
#   .venvs/opencompass  opencompass (eval stage)
# Each environment is rebuilt only when its inputs change (a hash stamp in the venv).
#
# CPU machine (default): every environment is installed from its lock file, envs/locks/<env>.txt
# (+ envs/locks/<env>-nodeps.txt), with every transitive package pinned and hash-checked, by uv
# (pinned in envs/uv.txt, bootstrapped into .venvs/uv with pip). The locks pin the CPU build of
# torch (torch==2.13.0+cpu, from /opt/wheels). Regenerate them with `bash envs/lock.sh` after
# changing a pin in envs/*.txt.
# GPU machine: TUNEPIPE_TORCH=envs/torch-gpu.txt ./setup.sh   (a CUDA build of torch instead)
#   There are no GPU locks (this CPU machine cannot resolve and test a CUDA stack), so this path
#   falls back to pip from the top-level pins in envs/*.txt: transitive packages float there.
#   TUNEPIPE_INSTALLER=pip ./setup.sh takes that pip path on a CPU machine too.
# Only some environments: TUNEPIPE_ENVS="core xtuner" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_PINS=${TUNEPIPE_TORCH:-envs/torch-cpu.txt}
ENVS=${TUNEPIPE_ENVS:-core xtuner lmdeploy opencompass}
USE_LOCKS=0
[ "$TORCH_PINS" = envs/torch-cpu.txt ] && [ "${TUNEPIPE_INSTALLER:-uv}" != pip ] && USE_LOCKS=1

quiet_pip() {  # pip with the local mirror's "Location ... is ignored" noise filtered out
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

bootstrap_uv() {  # uv itself, pinned in envs/uv.txt, in a small venv of its own
  local venv=.venvs/uv
  local stamp="$venv/.tunepipe-$(sha256sum < envs/uv.txt | cut -c1-16)"
  UV=$venv/bin/uv
  if [ -f "$stamp" ]; then return; fi
  echo "[setup] uv: installing (envs/uv.txt)"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  quiet_pip "$venv/bin/pip" install -q -r envs/uv.txt
  rm -f "$venv"/.tunepipe-*
  touch "$stamp"
}

env_inputs() {  # the files an environment is built from, on this path
  local name=$1
  if [ "$USE_LOCKS" = 1 ]; then
    echo "envs/locks/$name.txt"
    [ -f "envs/locks/$name-nodeps.txt" ] && echo "envs/locks/$name-nodeps.txt"
  else
    echo "$TORCH_PINS" "envs/$name.txt"
    [ -f "envs/$name-nodeps.txt" ] && echo "envs/$name-nodeps.txt"
  fi
  return 0
}

install_from_locks() {  # exactly the lock's packages, hash-checked (sync also removes strays)
  local venv=$1; shift
  "$UV" pip sync -q --python "$venv/bin/python" --require-hashes "$@"
}

install_with_pip() {  # GPU path: top-level pins only
  local name=$1 venv=$2
  quiet_pip "$venv/bin/pip" install -q -r "$TORCH_PINS"
  quiet_pip "$venv/bin/pip" install -q -c "$TORCH_PINS" -r "envs/$name.txt"
  if [ -f "envs/$name-nodeps.txt" ]; then
    # packages whose own pins conflict with the stack above, installed without their deps
    quiet_pip "$venv/bin/pip" install -q --no-deps -r "envs/$name-nodeps.txt"
  fi
}

make_env() {
  local name=$1 venv=.venvs/$1
  local files
  mapfile -t files < <(env_inputs "$name" | tr ' ' '\n')
  if [ "$USE_LOCKS" = 1 ] && ! sha256sum --quiet -c "envs/locks/$name.sha256" >/dev/null 2>&1; then
    echo "[setup] $name: envs/locks/$name.txt is older than its pins in envs/: run bash envs/lock.sh $name" >&2
    exit 1
  fi
  local stamp="$venv/.tunepipe-$(cat "${files[@]}" pyproject.toml | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then echo "[setup] $name: up to date"; return; fi
  echo "[setup] $name: installing (${files[*]})"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  if [ "$USE_LOCKS" = 1 ]; then
    install_from_locks "$venv" "${files[@]}"
    # the project itself, editable, without deps (its deps are the lock above)
    if [ "$name" = core ]; then "$UV" pip install -q --python "$venv/bin/python" --no-deps -e .; fi
  else
    install_with_pip "$name" "$venv"
    if [ "$name" = core ]; then quiet_pip "$venv/bin/pip" install -q --no-deps -e .; fi
  fi
  rm -f "$venv"/.tunepipe-*
  touch "$stamp"
}

mkdir -p .venvs
if [ "$USE_LOCKS" = 1 ]; then
  bootstrap_uv
  source envs/uv-env.sh
fi
for env in $ENVS; do make_env "$env"; done

# The pipeline needs a git repo with a commit (dvc exp run) and DVC initialised.
if [ ! -d .dvc ] && [ -x .venvs/core/bin/dvc ]; then .venvs/core/bin/dvc init -q; fi
# The default DVC remote: the folder ../tunepipe-dvc-remote beside this checkout (.dvc/config), so
# `dvc push` / `dvc pull` (and `tunepipe reproduce`) work out of the box; `dvc remote add -d` changes it.
if [ -x .venvs/core/bin/dvc ]; then
  if [ -z "$(.venvs/core/bin/dvc remote list)" ]; then .venvs/core/bin/dvc remote add -d local ../tunepipe-dvc-remote; fi
  if [ "$(.venvs/core/bin/dvc remote default)" = local ]; then mkdir -p ../tunepipe-dvc-remote; fi
fi
echo "[setup] done. Run the pipeline with: .venvs/core/bin/dvc repro"

# ---- review report test (tests/test_review.py) --------------------------------------------------
# The test renders registry/review.html in headless Chromium through playwright, using Debian's
# chromium package rather than a browser playwright would download (no network needed at test time).
# Installed only when we are root, apt-get exists and chromium is missing; without it the test skips.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  echo "[setup] chromium: installing (apt-get) for the review report's browser test"
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null \
    || echo "[setup] chromium: not installed; tests/test_review.py's browser test will skip"
fi

# ---- shared servers (tunepipe services, tests/test_services.py) ---------------------------------
# PostgreSQL from Debian's packages backs `mlflow server`; stages/services.py runs it (initdb, pg_ctl)
# as a non-root user in a temporary folder. Installed only as root with apt-get, when initdb is found
# neither on PATH nor under /usr/lib/postgresql; without it tests/test_services.py skips.
# (moto's S3 server, dvc-s3 and psycopg2 are in the core environment's lock.)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] postgresql: installing (apt-get) for tunepipe services and tests/test_services.py"
    { apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; } >/dev/null \
      || echo "[setup] postgresql: not installed; tests/test_services.py will skip"
  else
    echo "[setup] postgresql: not installed and not root: sudo apt-get install postgresql for tunepipe services" \
         "(tests/test_services.py skips without it)"
  fi
fi
