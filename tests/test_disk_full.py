"""A full disk while a stage writes an out: one clear line naming the out and the free space, no
partial out and no temporary file left (stages/common.py atomic_path)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_stage
from stages.common import StageError, atomic_path, write_jsonl

ROW = {"text": "x" * 1000}


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real file system that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (mount -t tmpfs -o size=64k)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_file_out_on_a_full_disk(small_disk):
    out = small_disk / "data" / "records.jsonl"
    write_jsonl(out, [ROW] * 3)  # a small earlier out
    before = out.read_bytes()
    with pytest.raises(StageError) as e:
        write_jsonl(out, [ROW] * 200)  # ~200 KB into 64 KiB
    message = str(e.value)
    assert message.startswith(f"{out}: disk full while writing it (") and "\n" not in message
    assert f" free in {out.parent}); nothing was written" in message
    free = message.split("(")[1].split(" free")[0]
    assert free.endswith(("B", "KiB")) and float(free.split()[0]) > 0  # the temp file's space was given back
    assert out.read_bytes() == before  # the old out untouched, no partial one
    assert sorted(p.name for p in out.parent.iterdir()) == ["records.jsonl"]  # no temp file


def test_folder_out_on_a_full_disk(small_disk):
    import torch
    from safetensors.torch import save_file

    out = small_disk / "models" / "merged"
    with pytest.raises(StageError, match=r"models/merged: disk full while writing it \(.* free in .*models\)"):
        with atomic_path(out, is_dir=True) as tmp:
            (tmp / "config.json").write_text("{}")
            save_file({"w": torch.zeros(64, 1024)}, tmp / "model.safetensors")  # 256 KB through Rust's writer
    assert list(out.parent.iterdir()) == []


def test_a_stage_on_a_full_disk_fails_in_one_line(workdir, small_disk):
    run_stage(workdir, "demo_data")
    out = small_disk / "records.jsonl"
    # the demo's ingested records are ~140 KB: more than the 64 KiB disk holds
    result = subprocess.run([sys.executable, "-m", "stages.ingest", "--out", str(out)], cwd=workdir,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {out}: disk full while writing it (")
    assert list(small_disk.iterdir()) == []


def test_enospc_anywhere_in_the_write_is_the_same_clean_failure(tmp_path):
    """File-system independent: the write itself raises ENOSPC halfway."""
    out = tmp_path / "eval" / "predictions.jsonl"
    with pytest.raises(StageError, match=r"predictions\.jsonl: disk full while writing it \(.+ free in "):
        with atomic_path(out) as tmp, open(tmp, "w") as f:
            f.write("half a row")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(out.parent.iterdir()) == []
    with pytest.raises(OSError, match="Permission denied"):  # other errors pass through unchanged
        with atomic_path(out) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(out.parent.iterdir()) == []
