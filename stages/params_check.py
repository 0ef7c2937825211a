"""Contradictions between params.yaml sections (or between a section and this machine), found
before any stage does work: every problem at once, each naming its keys.

Each stage's own pydantic model checks its section alone; this checks what no one section can
see. It reads the raw yaml (with each stage's defaults for absent keys), so it imports no stage
module, and torch only when a setting asks for CUDA. `tunepipe check-params` runs it by hand;
`load_params` runs it for every stage.
"""
from __future__ import annotations

from pathlib import Path

from stages.common import StageError

# models the pipeline's stages make, that eval can score (dvc.yaml: base, merge, turbomind stages)
MADE_MODELS = {"base": "base stage (models/base)", "merged": "merge stage (models/merged)",
               "turbomind": "turbomind stage (models/turbomind)"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # an environment without torch has no CUDA for us either
        return False
    return bool(torch.cuda.is_available())


def cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _section(everything: dict, name: str) -> dict:
    value = everything.get(name)
    return value if isinstance(value, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def device_problems(everything: dict, has_cuda) -> list[str]:
    """Settings that need a GPU; has_cuda is called (importing torch) only if one is set."""
    train, merge, tm, ev = (_section(everything, s) for s in ("train", "merge", "turbomind", "eval"))
    wants = []
    if train.get("quantize") == "nf4":  # both backends: bitsandbytes' 4-bit kernels
        wants.append("train.quantize: nf4 (QLoRA through bitsandbytes) needs CUDA")
    for name, section in (("merge", merge), ("turbomind", tm), ("eval", ev)):
        if section.get("device") == "cuda":
            wants.append(f"{name}.device: cuda needs CUDA")
    if tm.get("dtype") == "bfloat16" and tm.get("device", "auto") == "auto":
        wants.append("turbomind.dtype: bfloat16 with turbomind.device: auto needs CUDA (float16 runs on a CPU)")
    if not wants or has_cuda():
        return []
    return [f"{w}, but no CUDA GPU is visible on this machine" for w in wants]


def process_problems(everything: dict, gpus=cuda_count, deepspeed=has_deepspeed) -> list[str]:
    """train.devices / sharding / device against this machine (gpus and deepspeed called only when
    a setting needs them): more GPU processes than GPUs, a CUDA device without one, ZeRO without
    deepspeed. On a CPU (train.device: cpu) devices N means N gloo processes."""
    train = _section(everything, "train")
    devices, sharding, device = train.get("devices", 1), train.get("sharding", "none"), train.get("device", "auto")
    several = devices == "auto" or (isinstance(devices, int) and devices > 1)
    problems = []
    if sharding.startswith("zero") and several and not deepspeed():
        problems.append(f"train.sharding: {sharding} needs deepspeed, which this environment lacks "
                        "(envs/core.txt and envs/xtuner.txt pin it; rerun ./setup.sh)")
    if train.get("backend") == "xtuner" and device == "cpu" and isinstance(devices, int) and devices > 1:
        problems.append(f"train.devices: {devices} with train.device: cpu: the xtuner backend's processes need "
                        "CUDA GPUs (mmengine's init_dist sets a CUDA device); use train.backend: hf on a CPU")
    if device == "cuda" or (isinstance(devices, int) and devices > 1 and device != "cpu"):
        found = gpus()
        if device == "cuda" and not found:
            problems.append("train.device: cuda, but no CUDA GPU is visible on this machine")
        elif isinstance(devices, int) and devices > found:
            problems.append(f"train.devices: {devices} processes, one a GPU, but {found} CUDA GPU(s) are visible"
                            + (" (train.device: cpu runs them as CPU processes)" if not found else ""))
    return problems


def split_problems(everything: dict) -> list[str]:
    split = _section(everything, "split")
    val, test = _number(split.get("val_ratio", 0.1)), _number(split.get("test_ratio", 0.1))
    problems = []
    if val is not None and test is not None and val + test >= 1:
        problems.append(f"split.val_ratio ({val:g}) + split.test_ratio ({test:g}) = {val + test:g}: "
                        "must stay under 1, or no row is left to train on")
    shares = [_number(m.get("share")) for m in split.get("mix") or [] if isinstance(m, dict)]
    if sum(s for s in shares if s is not None) > 1:
        problems.append(f"split.mix[*].share sum to {sum(s for s in shares if s is not None):g}: at most 1")
    return problems


def model_problems(everything: dict) -> list[str]:
    ev = _section(everything, "eval")
    models = ev.get("models", list(MADE_MODELS))
    problems = []
    for n, name in enumerate(models if isinstance(models, list) else [models]):
        if name not in MADE_MODELS:
            problems.append(f"eval.models[{n}] '{name}': no stage makes it (stages make: "
                            f"{'; '.join(f'{k} by the {v}' for k, v in MADE_MODELS.items())})")
    return problems


def judge_problems(everything: dict) -> list[str]:
    judge = _section(_section(everything, "clean"), "judge")
    if judge.get("enabled") and not str(judge.get("model") or "").strip():
        return ["clean.judge.enabled: true, but clean.judge.model is empty"]
    return []


def check_params(everything: dict, path: Path | str = "params.yaml", has_cuda=cuda_available, gpus=cuda_count,
                 deepspeed=has_deepspeed) -> None:
    """Raise one StageError listing every cross-section contradiction in `everything` (the parsed
    params file at `path`), each naming its keys; return None when there is none."""
    problems = [*device_problems(everything, has_cuda), *process_problems(everything, gpus, deepspeed),
                *split_problems(everything), *model_problems(everything),
                *judge_problems(everything)]
    if problems:
        raise StageError(f"{path}: {len(problems)} contradicting param(s):\n"
                         + "\n".join(f"{path}: {p}" for p in problems))


def check_params_file(path: Path | str) -> None:
    import yaml

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: params file not found")
    check_params(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, path)
