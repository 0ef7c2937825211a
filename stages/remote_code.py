"""Models whose code ships in the model folder (config.json `auto_map`), run only when allowed.

`base.trust_remote_code: true` lets transformers import and run the Python files of the base model
(configuration_*.py, modeling_*.py, tokenization_*.py). That is code from the model's publisher,
so it is allowed only for code that cannot change under the pipeline: a local folder, or a hub
model pinned to a full 40-hex commit sha (a branch or tag can be moved to other code).

The base stage records the setting in models/base/manifest.json and every stage loads the base
with it (stages.common.resolve_base). Models the pipeline writes from such a base (models/merged,
models/turbomind) carry a copy of the same code (save_pretrained copies it next to the weights);
they are loaded with trust_remote_code when their config.json maps AutoModelForCausalLM to a file
in the folder itself (`load_kwargs`). Stdlib only: stages in every environment import it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from stages.common import StageError

FULL_SHA = re.compile(r"[0-9a-f]{40}")


def refuse_unpinned(model_id: str, revision: str | None) -> None:
    """base.trust_remote_code needs a local folder or a full commit sha."""
    if Path(model_id).is_dir() or FULL_SHA.fullmatch(revision or ""):
        return
    raise StageError(f"params.yaml: base.trust_remote_code is true for hub model {model_id!r} at revision "
                     f"{revision!r}: pin base.revision to a full 40-hex commit sha (or use a local folder), "
                     "so the code that runs is the code you checked")


def auto_maps(folder: str | Path) -> dict:
    """config.json's and tokenizer_config.json's auto_map entries, merged."""
    found = {}
    for name in ("tokenizer_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            found.update(json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {})
    return found


def code_files(reference: str | list | None) -> list[str]:
    """'modeling_x.XForCausalLM' (or 'repo--modeling_x.X', or [slow, fast]) -> ['modeling_x.py']."""
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    return [r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in references if r]


def shipped_code(folder: str | Path) -> list[str]:
    """The folder's own Python files that its auto_map entries name (and that exist)."""
    names = {f for reference in auto_maps(folder).values() for f in code_files(reference)}
    return sorted(n for n in names if (Path(folder) / n).is_file())


def needs_remote_code(folder: str | Path) -> bool:
    """The folder's causal-LM class is code in the folder, for a model_type transformers does not
    know (a native model_type loads natively even where auto_map is left in config.json)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not code_files((config.get("auto_map") or {}).get("AutoModelForCausalLM")):
        return False
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return True
    return config.get("model_type") not in CONFIG_MAPPING


def load_kwargs(folder: str | Path) -> dict:
    """from_pretrained kwargs for a model folder the pipeline wrote (merged, turbomind): with
    trust_remote_code when its auto_map names code shipped inside the folder."""
    return {"trust_remote_code": True} if shipped_code(folder) else {}
