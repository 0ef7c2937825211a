#!/usr/bin/env bash
# What benchmarks/gpu_pipeline.py needs on the lent GPU machine beyond its image (python 3.12, torch,
# transformers, peft, accelerate, numpy 2, pandas, pyarrow, ...: .library/device/KINDS.md), as wheels
# in .whl/ (git-ignored; name it in the device run's `carry`), plus the benchmark's data in
# .whl/gpubench-data/ (../shared/data does not travel). Exactly the packages the stages import there:
#   all stages  pydantic 2.14.3 / pydantic_core 2.50.4 (stages/common.py)
#   turbomind   lmdeploy 0.18.0 without its TurboMind extension (it links CUDA 12; the machine has
#               CUDA 13) and libxgrammar.a: the AWQ quantizer (lmdeploy.lite) and chat templates only
#   eval        opencompass 0.5.4 and what `import opencompass.datasets` imports (it imports every
#               dataset module); jieba (19 MB, sdist only) and tree_sitter(_languages) (9 MB) are not
#               carried: gpu_pipeline.py gives the eval stage stand-ins for them (only datasets this
#               benchmark does not run use them)
#   serving     lmdeploy's api_server on its PyTorch engine (benchmarks/serve_throughput.py): the lmdeploy
#               wheel above plus what lmdeploy.serve imports (dependency-facts.md lists the set that ran)
#   register    mlflow 3.17.2 without its web UI (mlflow/server/js/build, 25 MB; register reads the
#               version of the `mlflow` distribution, which mlflow-skinny alone lacks) and what the
#               sqlite tracking store imports (sqlalchemy, alembic, cryptography, ...)
# Usage: benchmarks/gpu_wheels.sh              cp312 wheels for the GPU machine into .whl/
#        PYVER=3.11 DEST=/tmp/whl311 benchmarks/gpu_wheels.sh   the same set for this machine's python
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"

COMMON="pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5"
LMDEPLOY="mmengine-lite==0.11.0rc3 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.9 pybase64==1.5.1"
OPENCOMPASS="opencompass==0.5.4 datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 evaluate==0.4.6 nltk==3.10.4
  rouge==1.0.1 rouge-chinese==1.0.3 fuzzywuzzy==0.18.0 levenshtein==0.27.5 rapidfuzz==3.14.6 gradio_client==2.7.2
  jsonlines==4.0.0 lazy-importer==0.1.0 openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1
  prettytable==3.19.0 wcwidth==0.9.4 rank-bm25==0.2.2 retrying==1.4.2 defusedxml==0.7.1 importlib_metadata==9.1.0"
SERVE="shortuuid==1.0.13 fire==0.7.1 pyzmq==27.3.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 openai-harmony==0.0.8
  partial-json-parser==0.2.1.1.post7"
SDIST_ONLY="rouge_score==0.1.2 timeout-decorator==0.5.0"   # built here into pure-python wheels
MLFLOW="opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1
  cachetools==7.3.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 databricks-sdk==0.167.0 google-auth==2.63.0
  pyasn1==0.6.5 pyasn1_modules==0.4.2 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 fastapi==0.165.0
  starlette==1.10.0 python-dotenv==1.2.4 uvicorn==0.55.0"

PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
pip() {  # pip without the local mirror's "Location ... is ignored" noise
  python3 -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
fetch() {  # binary wheels for python $PYVER on x86-64 Linux, no dependencies resolved
  pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$@"
}
# shellcheck disable=SC2086
fetch $COMMON $LMDEPLOY $OPENCOMPASS $MLFLOW $SERVE
# shellcheck disable=SC2086
pip wheel -q --no-deps --no-binary=:all: -w "$DEST" $SDIST_ONLY

strip() {  # strip SPEC REGEX: SPEC's wheel without the files whose path matches REGEX (and their RECORD lines)
  local tmp
  ls "$DEST/${1%%==*}"-*.whl >/dev/null 2>&1 && return
  tmp=$(mktemp -d)
  fetch -d "$tmp" "$1"
  python3 - "$tmp"/*.whl "$DEST" "$2" <<'EOF'
import re, sys, zipfile
from pathlib import Path
src, dest, drop = Path(sys.argv[1]), Path(sys.argv[2]), re.compile(sys.argv[3]).search
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not drop(item.filename):
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if not drop(line.split(b",")[0].decode()))
            zout.writestr(item, data)
print(f"{src.name}: {src.stat().st_size / 2**20:.1f} MiB, stripped {(dest / src.name).stat().st_size / 2**20:.1f} MiB")
EOF
  rm -rf "$tmp"
}
strip lmdeploy==0.18.0 '^lmdeploy/turbomind/(_turbomind[^/]*\.so|lib64/libxgrammar\.a)$'
strip mlflow==3.17.2 '^mlflow/server/js/build/'

python3 benchmarks/gpu_pipeline.py --prepare-data-only --data "$DEST/gpubench-data"

# every wheel installs for python $PYVER (tags checked by pip; nothing is compiled or run)
check=$(mktemp -d)
pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version "$PYVER" \
  --upgrade --implementation cp "${PLATFORMS[@]}" --target "$check" "$DEST"/*.whl
rm -rf "$check"
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 2^20, $9}'
du -sb "$DEST" | awk '{printf "total %.1f MiB in %s (wheels and data): installs for python '"$PYVER"'\n", $1 / 2^20, $2}'
