# Sourced by setup.sh and envs/lock.sh: point uv at the same places pip's config does on the
# project machines (PyPI, plus the local mirrors and the wheel folder that holds the CPU torch
# build), and let it pick the best match across all of them, as pip does.
export UV_DEFAULT_INDEX=${UV_DEFAULT_INDEX:-https://pypi.org/simple}
extra_indexes=""
for dir in /opt/pypi/simple /opt/pypi-more/simple; do
  [ -d "$dir" ] && extra_indexes="$extra_indexes file://$dir"
done
export UV_INDEX=${UV_INDEX:-${extra_indexes# }}
[ -d /opt/wheels ] && export UV_FIND_LINKS=${UV_FIND_LINKS:-/opt/wheels}
export UV_INDEX_STRATEGY=${UV_INDEX_STRATEGY:-unsafe-best-match}
export UV_NO_PROGRESS=1
unset extra_indexes dir
