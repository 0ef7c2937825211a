"""DVC's content hashes, read from dvc.lock or computed from the files, without importing DVC.

register tags a model version with the md5 dvc.lock records for each model folder; upload checks
that the folder it is about to publish still has that md5. DVC's md5 of a file is the md5 of its
bytes; of a folder, the md5 of the JSON list of its files' md5s and relative paths (sorted by
path), with ".dir" appended (dvc_data.hashfile.tree.Tree.digest). tests/test_register_upload.py
checks dvc_md5 against DVC's own implementation. Standard library only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml


def lock_hashes(lock_path: str | Path) -> dict:
    """md5 of every stage out recorded in dvc.lock: what data and which weights this run used."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            hashes[out["path"]] = out.get("md5", "")
    return hashes


def file_md5(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for `path` (a file, or a folder: "<md5>.dir"). Reads every byte."""
    path = Path(path)
    if not path.is_dir():
        return file_md5(path)
    entries = sorted(({"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
