"""Every shim in stages/shims.py stands for an upstream breakage. The `test_still_broken_*` tests
assert that the breakage is still there, in the environment the shim is for: when one FAILS,
upstream was fixed (or the env changed), and the shim and its test should be removed.
The last tests check that the shims do make the tools work.

The xtuner shims' tests run in .venvs/xtuner (./setup.sh, or TUNEPIPE_ENVS=xtuner ./setup.sh), through
subprocesses, whichever env runs pytest; the serve shims' tests run in this process (.venvs/core).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
XTUNER_PY = ROOT / ".venvs" / "xtuner" / "bin" / "python"

needs_xtuner = pytest.mark.skipif(
    not XTUNER_PY.exists(),
    reason=f"{XTUNER_PY.relative_to(ROOT)} missing: build it with `TUNEPIPE_ENVS=xtuner ./setup.sh`",
)

sys.path.insert(0, str(ROOT))
from stages import shims  # noqa: E402  (standard library only)


def run_xtuner_py(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(XTUNER_PY), "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# One process gathers the facts, in the order the shims are applied, each checked with only the
# shims before it (which it needs to get that far) applied.
FACTS_SCRIPT = r"""
import json, sys, tempfile
from stages import shims
facts = {}

# before any shim: mmengine's own loader on a checkpoint of the kind its Runner writes
import numpy, torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader
with tempfile.NamedTemporaryFile(suffix=".pth") as f:
    loss = HistoryBuffer()
    loss.update(numpy.float64(1.0))
    torch.save({"meta": {"iter": 3}, "message_hub": {"log_scalars": {"loss": loss}}}, f.name)
    try:
        CheckpointLoader.load_checkpoint(f.name, map_location="cpu")
        facts["mmengine_load_checkpoint_error"] = None
    except Exception as e:
        facts["mmengine_load_checkpoint_error"] = f"{type(e).__name__}: {str(e)[:200]}"

import torch
facts["torch_version"] = torch.__version__
facts["torch_cpu_has_is_bf16_supported"] = hasattr(torch.cpu, "is_bf16_supported")

import transformers, transformers.utils
facts["transformers_version"] = transformers.__version__
facts["transformers_has_is_safetensors_available"] = hasattr(transformers.utils, "is_safetensors_available")

import importlib.util
facts["torchvision_installed"] = importlib.util.find_spec("torchvision") is not None
shims.apply("xtuner", skip=("xtuner_internvl_without_torchvision", "xtuner_bos_for_tokenizers_without_bos",
                            "mmengine_resume_loads_its_checkpoints"))
try:
    import xtuner.dataset
    facts["import_xtuner_dataset_error"] = None
except Exception as e:
    facts["import_xtuner_dataset_error"] = f"{type(e).__name__}: {e}"

shims.apply("xtuner", skip=("xtuner_bos_for_tokenizers_without_bos",))
from xtuner.dataset.utils import get_bos_eos_token_ids
from transformers import Qwen2Tokenizer
tok = Qwen2Tokenizer(vocab={"a": 0, "b": 1, "<|im_end|>": 2}, merges=[], eos_token="<|im_end|>", unk_token=None)
facts["qwen2_tokenizer_class"] = type(tok).__name__
facts["xtuner_bos_for_qwen2_without_bos"] = get_bos_eos_token_ids(tok)[0]
print("FACTS=" + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts() -> dict:
    proc = run_xtuner_py(FACTS_SCRIPT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FACTS=")), None)
    assert line, f"fact-finding script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("FACTS="):])


def test_every_shim_has_a_test():
    tested = {"torch_cpu_is_bf16_supported", "transformers_is_safetensors_available",
              "xtuner_internvl_without_torchvision", "xtuner_bos_for_tokenizers_without_bos",
              "mmengine_resume_loads_its_checkpoints"}
    assert set(shims.names("xtuner")) == tested, "a shim was added or removed: update tests/test_shims.py"
    assert set(shims.names("serve")) == {"transformers_serve_lists_its_pinned_model"}, (
        "a serve shim was added or removed: update tests/test_shims.py")


@needs_xtuner
def test_still_broken_torch_cpu_is_bf16_supported(facts):
    assert not facts["torch_cpu_has_is_bf16_supported"], (
        f"torch {facts['torch_version']} now has torch.cpu.is_bf16_supported: "
        "remove shims.torch_cpu_is_bf16_supported")


@needs_xtuner
def test_still_broken_transformers_is_safetensors_available(facts):
    assert not facts["transformers_has_is_safetensors_available"], (
        f"transformers {facts['transformers_version']} has utils.is_safetensors_available again: "
        "remove shims.transformers_is_safetensors_available")


@needs_xtuner
def test_still_broken_xtuner_needs_torchvision(facts):
    error = facts["import_xtuner_dataset_error"]
    assert not facts["torchvision_installed"] and error and "torchvision" in error, (
        "`import xtuner.dataset` no longer fails for want of torchvision "
        f"(torchvision installed: {facts['torchvision_installed']}, error: {error}): "
        "remove shims.xtuner_internvl_without_torchvision")


@needs_xtuner
def test_still_broken_xtuner_bos_for_transformers5_qwen2_tokenizer(facts):
    assert facts["qwen2_tokenizer_class"] not in ("QWenTokenizer", "QWen2Tokenizer", "Qwen2TokenizerFast")
    assert facts["xtuner_bos_for_qwen2_without_bos"] is None, (
        "xtuner's get_bos_eos_token_ids now handles a BOS-less tokenizer "
        f"({facts['qwen2_tokenizer_class']}): remove shims.xtuner_bos_for_tokenizers_without_bos")


def test_still_broken_mmengine_load_checkpoint_under_torch_weights_only(facts):
    error = facts["mmengine_load_checkpoint_error"]
    assert error and "weights_only" in error.lower().replace(" ", "_"), (
        f"mmengine loads its own checkpoints under torch {facts['torch_version']} again ({error}): "
        "remove shims.mmengine_resume_loads_its_checkpoints")


@needs_xtuner
def test_shims_make_xtuner_tools_run():
    """With the shims, xtuner's tool modules import and run (here: pth_to_hf --help, through
    `python -m stages.shims`, the way a user reruns a generated config)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(XTUNER_PY), "-m", "stages.shims", "xtuner.tools.model_converters.pth_to_hf", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Convert the pth model to HuggingFace model" in proc.stdout


@needs_xtuner
def test_shims_apply_is_idempotent_and_patches():
    proc = run_xtuner_py(
        "from stages import shims\n"
        "first = shims.apply('xtuner'); second = shims.apply('xtuner')\n"
        "import torch, transformers.utils as u, xtuner.dataset.utils as x\n"
        "assert isinstance(torch.cpu.is_bf16_supported(), bool)\n"
        "assert u.is_safetensors_available()\n"
        "class T: bos_token_id = None; eos_token_id = 2\n"
        "assert x.get_bos_eos_token_ids(T()) == ([], [2])\n"
        "import numpy, tempfile\n"
        "from mmengine.logging import HistoryBuffer\n"
        "from mmengine.runner.checkpoint import CheckpointLoader\n"
        "f = tempfile.NamedTemporaryFile(suffix='.pth')\n"
        "hub = HistoryBuffer(); hub.update(numpy.float64(1.0)); torch.save({'hub': hub}, f.name)\n"
        "assert CheckpointLoader.load_checkpoint(f.name, map_location='cpu')['hub'].current() == 1.0\n"
        "print('APPLIED', first, second)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "APPLIED" in proc.stdout and proc.stdout.strip().endswith("[]"), proc.stdout


# --- serve (transformers serve in .venvs/core; `tunepipe serve` applies these) --------------------

@pytest.fixture(scope="module")
def pinned_manager(tmp_path_factory):
    """transformers serve's ModelManager pinned to a local model folder (a tiny Qwen2), with an
    empty hub cache."""
    from families import FAMILIES, write_family_model
    from transformers.cli.serving.model_manager import ModelManager

    folder = write_family_model(FAMILIES["qwen2.5"], tmp_path_factory.mktemp("serve_shim") / "local_model")
    return ModelManager(device="cpu", force_model=str(folder))


def test_still_broken_transformers_serve_lists_only_the_hub_cache(pinned_manager, tmp_path, monkeypatch):
    from transformers.cli.serving.model_manager import ModelManager

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))   # an empty cache, wherever the machine's is
    get_gen_models = getattr(ModelManager.get_gen_models, "_tunepipe_original", ModelManager.get_gen_models)
    get_gen_models.cache_clear()
    try:
        listed = [m["id"] for m in get_gen_models(str(tmp_path))]
    except Exception as e:  # huggingface_hub's CacheNotFound: no cache at all
        listed = [repr(e)]
    assert pinned_manager.force_model not in listed, (
        "transformers serve now lists the local model it is pinned to: "
        "remove shims.transformers_serve_lists_its_pinned_model")


def test_serve_shim_lists_the_pinned_model(pinned_manager):
    shims.apply("serve")
    assert shims.apply("serve") == []                    # idempotent
    assert [m["id"] for m in pinned_manager.get_gen_models()] == [pinned_manager.force_model]
