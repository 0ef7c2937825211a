#!/usr/bin/env bash
# One idempotent set-up for tunepipe. Creates one virtual environment per tool family, because
# the named tools' pins do not co-install (README.md, Environments):
#   .venvs/core         dvc, mlflow, transformers, peft, datasets, openpyxl: drives `dvc repro`
#   .venvs/xtuner       xtuner 0.2 (train.backend=xtuner)
#   .venvs/lmdeploy     lmdeploy's AWQ quantizer (turbomind stage)
#   .venvs/opencompass  opencompass (eval stage)
# Each environment is rebuilt only when its pin files change (a hash stamp in the venv).
#
# CPU machine (default): torch comes from envs/torch-cpu.txt (the CPU build on this disk) and is
# passed as a constraint to every later pip call so nothing can pull a CUDA build.
# GPU machine: TUNEPIPE_TORCH=envs/torch-gpu.txt ./setup.sh   (a CUDA build of torch instead)
# Only some environments: TUNEPIPE_ENVS="core xtuner" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_PINS=${TUNEPIPE_TORCH:-envs/torch-cpu.txt}
ENVS=${TUNEPIPE_ENVS:-core xtuner lmdeploy opencompass}

quiet_pip() {  # pip with the local mirror's "Location ... is ignored" noise filtered out
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

make_env() {
  local name=$1 venv=.venvs/$1
  local files=("$TORCH_PINS" "envs/$name.txt")
  [ -f "envs/$name-nodeps.txt" ] && files+=("envs/$name-nodeps.txt")
  local stamp="$venv/.tunepipe-$(cat "${files[@]}" pyproject.toml | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then echo "[setup] $name: up to date"; return; fi
  echo "[setup] $name: installing (${files[*]})"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  quiet_pip "$venv/bin/pip" install -q -r "$TORCH_PINS"
  quiet_pip "$venv/bin/pip" install -q -c "$TORCH_PINS" -r "envs/$name.txt"
  if [ -f "envs/$name-nodeps.txt" ]; then
    # packages whose own pins conflict with the stack above, installed without their deps
    quiet_pip "$venv/bin/pip" install -q --no-deps -r "envs/$name-nodeps.txt"
  fi
  if [ "$name" = core ]; then quiet_pip "$venv/bin/pip" install -q --no-deps -e .; fi
  rm -f "$venv"/.tunepipe-*
  touch "$stamp"
}

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
