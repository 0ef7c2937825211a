"""The one place for shims over upstream breakage.

Each shim is a small function registered for the environment that needs it. It names what broke
(package, version), checks that the breakage is actually there, and patches only then, so applying
the shims where upstream is fixed (or on a machine with another torch) is a no-op.
tests/test_shims.py asserts, for every shim, that the breakage still exists: when one of those
tests fails, upstream was fixed and the shim should go.

Use:
    from stages import shims
    shims.apply("xtuner")        # before importing xtuner / peft / transformers models

Run one of a tool's own modules with the shims applied (e.g. to rerun a generated xtuner config):
    .venvs/xtuner/bin/python -m stages.shims xtuner.tools.train CONFIG.py --work-dir DIR

Standard library only at import time; each shim imports what it patches.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Callable

_SHIMS: dict[str, list[Callable[[], bool]]] = {}


def shim(env: str):
    """Register a shim for `env`. The function returns True if it patched something."""

    def register(fn: Callable[[], bool]) -> Callable[[], bool]:
        _SHIMS.setdefault(env, []).append(fn)
        return fn

    return register


def names(env: str) -> list[str]:
    return [fn.__name__ for fn in _SHIMS.get(env, [])]


def apply(env: str = "xtuner", skip: tuple[str, ...] = ()) -> list[str]:
    """Apply `env`'s shims in order (idempotent); return the names of those that patched."""
    if env not in _SHIMS:
        raise KeyError(f"no shims registered for environment '{env}' (known: {sorted(_SHIMS)})")
    return [fn.__name__ for fn in _SHIMS[env] if fn.__name__ not in skip and fn()]


# ---------------------------------------------------------------------------------------------
# xtuner 0.2.0 (pins transformers==4.48.0), installed --no-deps beside transformers 5.23 and CPU
# torch 2.13 in .venvs/xtuner (envs/xtuner.txt, envs/xtuner-nodeps.txt). Order matters: the
# first shims make `import xtuner.dataset` possible, the last one patches inside it.
# ---------------------------------------------------------------------------------------------

@shim("xtuner")
def xtuner_internvl_without_torchvision() -> bool:
    """What broke: xtuner 0.2.0's `xtuner/dataset/__init__.py` imports its InternVL dataset
    eagerly, and that module imports torchvision at module level, so `import xtuner.dataset`
    (every SFT config) needs torchvision. PyPI's torchvision (0.28.0 for torch 2.13) is a CUDA
    build: beside CPU torch its compiled ops do not load (`_C.so` needs libtorch_cuda.so) and
    `import torchvision` raises `RuntimeError: operator torchvision::nms does not exist`; worse,
    once it is installed transformers 5 imports it from `modeling_utils` (via image_utils), so
    every model import in the env breaks. So the xtuner env does not install torchvision, and
    this shim puts a stand-in for that one xtuner module (image-text InternVL training, which
    this project does not do) in sys.modules; using it raises a clear error."""
    name = "xtuner.dataset.internvl_dataset"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    if importlib.util.find_spec("xtuner") is None:
        return False
    stand_in = types.ModuleType(name, "tunepipe stand-in (stages/shims.py): torchvision is not installed")

    class InternVL_V1_5_Dataset:  # noqa: N801  (xtuner's name)
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                "xtuner's InternVL dataset needs torchvision, which the tunepipe xtuner env does not "
                "install (PyPI's CUDA build does not import beside CPU torch); see stages/shims.py"
            )

    stand_in.InternVL_V1_5_Dataset = InternVL_V1_5_Dataset
    sys.modules[name] = stand_in
    return True


@shim("xtuner")
def transformers_is_safetensors_available() -> bool:
    """What broke: transformers 5.0 removed `transformers.utils.is_safetensors_available`
    (safetensors became a hard dependency); xtuner 0.2.0 imports it at module level in
    `xtuner/utils/handle_moe_load_and_save.py`, so `import xtuner.utils` fails with ImportError."""
    import transformers.utils

    if hasattr(transformers.utils, "is_safetensors_available"):
        return False
    transformers.utils.is_safetensors_available = lambda: True
    return True


@shim("xtuner")
def torch_cpu_is_bf16_supported() -> bool:
    """What broke: torch (2.13 here) has `torch.cuda.is_bf16_supported()` but no
    `torch.cpu.is_bf16_supported`; xtuner 0.2.0 calls `get_torch_device().is_bf16_supported()`,
    which is `torch.cpu` on a CPU machine, whenever it builds a model
    (`SupervisedFinetune._prepare_for_flash_attn`) -> AttributeError. The answer only picks the
    dtype of xtuner's flash-attention / DeepSpeed "auto" settings, neither used on CPU; we answer
    honestly from the CPU's AVX512-BF16 flag."""
    import torch

    if hasattr(torch.cpu, "is_bf16_supported"):
        return False

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe()) if probe else False

    torch.cpu.is_bf16_supported = is_bf16_supported
    return True


@shim("xtuner")
def xtuner_bos_for_tokenizers_without_bos() -> bool:
    """What broke: xtuner 0.2.0's `xtuner.dataset.utils.get_bos_eos_token_ids` recognises Qwen
    tokenizers by the transformers-4 class names ("QWenTokenizer", "QWen2Tokenizer",
    "Qwen2TokenizerFast"); transformers 5 calls the class `Qwen2Tokenizer` (and a tokenizer built
    with `tokenizers` loads as `TokenizersBackend`), so for a tokenizer without a BOS token it
    returns bos=None and `encode_fn` fails (`input_ids += None`: TypeError). Patched so that no
    BOS token means no BOS ids, which is what xtuner does for Qwen and what the ChatML template
    renders."""
    import xtuner.dataset.utils as xdu

    original = xdu.get_bos_eos_token_ids
    if getattr(original, "_tunepipe_shim", False):
        return False

    def get_bos_eos_token_ids(tokenizer):
        bos, eos = original(tokenizer)
        return ([] if bos is None else bos), eos

    get_bos_eos_token_ids._tunepipe_shim = True
    xdu.get_bos_eos_token_ids = get_bos_eos_token_ids
    return True


@shim("xtuner")
def mmengine_resume_loads_its_checkpoints() -> bool:
    """What broke: torch 2.6 made `weights_only=True` the default of `torch.load`; mmengine 0.10.6's
    loader for local files (`mmengine.runner.checkpoint.load_from_local`, behind `Runner.resume`
    and `load_from`) calls `torch.load` without it, and mmengine's own checkpoints hold more than
    tensors (the message hub's HistoryBuffers, numpy arrays), so resuming a killed xtuner run
    fails with `UnpicklingError: Weights only load failed`. Patched: that loader reads with
    weights_only=False, as before torch 2.6 (it reads the checkpoints the stage's own run wrote)."""
    import inspect
    import os

    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader._schemes.get("")
    if original is None or getattr(original, "_tunepipe_shim", False) or "weights_only" in inspect.getsource(original):
        return False

    def load_from_local(filename, map_location):
        import torch

        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        return torch.load(filename, map_location=map_location, weights_only=False)

    load_from_local._tunepipe_shim = True
    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
    return True


# ---------------------------------------------------------------------------------------------
# transformers 5.23's own OpenAI-compatible server (`transformers serve`) in .venvs/core, run by
# `tunepipe serve` (stages/serve.py) through `python -m stages.shims --env serve ...`.
# ---------------------------------------------------------------------------------------------

@shim("serve")
def transformers_serve_lists_its_pinned_model() -> bool:
    """What broke: `transformers serve MODEL` (transformers 5.23) pins the server to MODEL (requests
    naming another model get 400), but GET /v1/models answers from the static
    `ModelManager.get_gen_models`, which lists the models in the Hugging Face hub cache only
    (huggingface_hub.scan_cache_dir). A server pinned to a local folder does not list it (and with
    no hub cache the endpoint fails), so an OpenAI client that picks its model from /v1/models finds
    nothing to ask. Patched: a pinned server lists its model, the only one it answers for; an
    unpinned one lists the cache as before."""
    import inspect
    import os

    from transformers.cli.serving.model_manager import ModelManager

    if not isinstance(inspect.getattr_static(ModelManager, "get_gen_models"), staticmethod):
        return False  # patched already, or upstream changed it (tests/test_shims.py says which)
    original = ModelManager.get_gen_models

    def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
        if self.force_model is None:
            return original(cache_dir)
        created = int(os.path.getmtime(self.force_model)) if os.path.exists(self.force_model) else 0
        return [{"id": self.force_model, "object": "model", "created": created, "owned_by": "local"}]

    get_gen_models._tunepipe_original = original
    ModelManager.get_gen_models = get_gen_models
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m stages.shims [--env ENV] MODULE [ARGS...]`: apply ENV's shims, then run MODULE
    as `__main__` with ARGS, as `python -m MODULE ARGS...` would."""
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    env = "xtuner"
    if args[:1] == ["--env"] and len(args) >= 2:
        env, args = args[1], args[2:]
    if not args:
        sys.exit("usage: python -m stages.shims [--env ENV] MODULE [ARGS...]")
    apply(env)
    sys.argv = [args[0], *args[1:]]
    runpy.run_module(args[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
