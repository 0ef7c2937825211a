#!/usr/bin/env bash
# Regenerate the lock files that setup.sh installs from:  bash envs/lock.sh [ENV...]
# For each environment, envs/locks/<env>.txt pins every transitive package of
# envs/torch-cpu.txt + envs/<env>.txt (torch constrained to the CPU build, which uv finds in
# /opt/wheels, so the lock carries that wheel's hash), with sha256 hashes;
# envs/locks/<env>-nodeps.txt pins envs/<env>-nodeps.txt alone (installed with --no-deps).
# Run it after changing any envs/*.txt pin and commit the locks with the pins. A package the pins
# do not fix keeps the version already in the lock (uv's preference for the output file), so a
# relock changes only what the new pins force; TUNEPIPE_LOCK_UPGRADE=1 re-resolves everything to
# the newest versions the pins allow. envs/locks/<env>.sha256 records the pin files a lock was
# made from: setup.sh refuses a lock whose pin files have changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venvs/uv/bin/uv}
[ -x "$UV" ] || UV=uv
source envs/uv-env.sh
ENVS=${*:-core xtuner lmdeploy opencompass}
UPGRADE=()
[ "${TUNEPIPE_LOCK_UPGRADE:-0}" = 1 ] && UPGRADE=(--upgrade)

compile() {  # compile OUT [uv pip compile args...]
  local out=$1; shift
  "$UV" pip compile -q --generate-hashes --python-version 3.11 --no-header \
    -c envs/torch-cpu.txt "${UPGRADE[@]}" "$@" -o "$out"
}

for env in $ENVS; do
  echo "[lock] $env"
  compile "envs/locks/$env.txt" envs/torch-cpu.txt "envs/$env.txt"
  # The CPU build, never PyPI's multi-GB CUDA build of the same version.
  grep -q '^torch==[^ ]*+cpu ' "envs/locks/$env.txt" ||
    { echo "[lock] $env: torch is not a +cpu build (is /opt/wheels there?)" >&2; exit 1; }
  if grep -qiE '^(nvidia-|triton==)' "envs/locks/$env.txt"; then
    echo "[lock] $env: a CUDA package got into the lock" >&2; exit 1
  fi
  inputs=(envs/torch-cpu.txt "envs/$env.txt")
  if [ -f "envs/$env-nodeps.txt" ]; then
    compile "envs/locks/$env-nodeps.txt" --no-deps "envs/$env-nodeps.txt"
    inputs+=("envs/$env-nodeps.txt")
  fi
  sha256sum "${inputs[@]}" > "envs/locks/$env.sha256"
done
