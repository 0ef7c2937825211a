"""The xtuner 0.2 config that stages/train_xtuner.py writes from params.yaml `train`, and the
command line it runs xtuner's trainer with.

Parity with the hf backend (stages/train.py), as far as xtuner 0.2 can:
- train.pack: xtuner isolates packed conversations from each other only with flash-attn's varlen
  attention (`use_varlen_attn`, CUDA). With flash-attn importable on a GPU the config packs with it;
  otherwise the stage trains unpacked (pack off, one warning line) rather than let packed
  conversations attend across each other.
- train.quantize nf4: QLoRA, the base loaded in 4 bits by bitsandbytes (xtuner's own QLoRA
  configs' BitsAndBytesConfig), on CUDA only; bitsandbytes is not in .venvs/xtuner by default
  (a CUDA-only build; envs/xtuner.txt).
- train.deepspeed zero2: DeepSpeed ZeRO-2 through xtuner's own `--deepspeed deepspeed_zero2`
  (xtuner swaps the optimizer wrapper for DeepSpeed's and takes batch size, gradient clipping and
  accumulation from this config).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from stages.common import StageError
from stages.train import TrainParams

CONFIG_NAME = "xtuner_config.py"
# xtuner's QLoRA model settings (its *_qlora_* configs), compute in train.dtype like the hf backend
QLORA = """
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.{dtype},
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        ),"""
DEEPSPEED_CONFIGS = {"zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3"}  # -> xtuner's configs/deepspeed/<name>.json


def varlen_attention_available(cuda: bool) -> bool:
    """xtuner's use_varlen_attn calls flash-attn's flash_attn_varlen_func: CUDA and flash_attn needed."""
    return cuda and importlib.util.find_spec("flash_attn") is not None


def resolve_packing(p: TrainParams, cuda: bool) -> tuple[TrainParams, bool, str]:
    """(params as xtuner will run them, use_varlen_attn, a warning or ""): packing only where the
    packed conversations stay isolated."""
    if not p.pack:
        return p, False, ""
    if varlen_attention_available(cuda):
        return p, True, ""
    return (p.model_copy(update={"pack": False}), False,
            "warning: train.pack ignored, trained unpacked: xtuner isolates packed conversations only with "
            "flash-attn's varlen attention (needs flash_attn and CUDA)")


def check_quantize(p: TrainParams, cuda: bool) -> None:
    """QLoRA needs bitsandbytes' CUDA kernels: one clear line instead of a failure deep in xtuner."""
    if p.quantize != "nf4":
        return
    if not cuda:
        raise StageError("params.yaml: train.quantize=nf4 (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit); "
                         "set train.quantize: none on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StageError("params.yaml: train.quantize=nf4 needs bitsandbytes in .venvs/xtuner (a CUDA build, "
                         "e.g. bitsandbytes==0.45.0, which xtuner 0.2 asks for)")


def single_process_env() -> dict[str, str]:
    """The torch.distributed rendezvous of a one-process job: DeepSpeed initializes a process group
    even for one process and, finding no RANK/WORLD_SIZE, goes looking for MPI (mpi4py) instead.
    Values already set (torchrun, a cluster launcher) win where the caller merges them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def deepspeed_config(p: TrainParams, cuda: bool, zero: str) -> dict:
    """xtuner's own ZeRO json for `zero` (train.deepspeed, or train.sharding on several processes), its precision set from train.dtype: xtuner's "auto"
    picks fp16 wherever bf16 is missing, and DeepSpeed refuses fp16 on a CPU (this pipeline trains in
    fp32, or bf16 on a GPU, never fp16)."""
    import json

    import xtuner

    path = Path(xtuner.__file__).parent / "configs" / "deepspeed" / f"{DEEPSPEED_CONFIGS[zero]}.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["fp16"] = {**config.get("fp16", {}), "enabled": False}
    config["bf16"] = {**config.get("bf16", {}), "enabled": p.dtype == "bfloat16" and cuda}
    return config


def train_args(config: Path, work: Path, deepspeed_json: Path | None = None) -> list[str]:
    """xtuner.tools.train's arguments: the config, the work dir and, with train.deepspeed, its own
    --deepspeed flag naming the ZeRO json (deepspeed_config, written next to the config)."""
    args = [str(config), "--work-dir", str(work)]
    if deepspeed_json is not None:
        args += ["--deepspeed", str(deepspeed_json)]
    return args


def render_config(p: TrainParams, *, base: str, revision: str | None, train_file: Path,
                  plan: dict, map_num_proc: int, use_amp: bool, trust_remote_code: bool = False,
                  resume: bool = False, use_varlen_attn: bool = False, dist_backend: str = "nccl") -> str:
    """An xtuner 0.2 config (python), in the layout of xtuner's own configs."""
    r = repr
    spe = plan["steps_per_epoch"]
    w = plan["warmup_steps"]
    # schedulers are given in epochs and converted by mmengine with the real epoch length;
    # (w + 0.5) / spe epochs converts back to exactly w steps (int() truncates)
    warmup_end = (w + 0.5) / spe if w > 0 else 0
    # the base's from_pretrained kwargs (stages.common.resolve_base), for its tokenizer and model;
    # trust_remote_code (base.trust_remote_code) runs the code that ships with the model
    extras = ([f"revision={r(revision)},"] if revision else []) + (["trust_remote_code=True,"] if trust_remote_code else [])
    llm_extra = "".join("\n        " + e for e in extras)
    tokenizer_extra = "".join("\n    " + e for e in extras)
    if w > 0:
        schedulers = """[
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         convert_to_iter_based=True),
]"""
    else:
        schedulers = """[
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=0, end=max_epochs,
         convert_to_iter_based=True),
]"""
    optim_type = "AmpOptimWrapper" if use_amp else "OptimWrapper"
    amp = '\n    dtype="bfloat16",' if use_amp else ""
    quantization = QLORA.format(dtype=p.dtype) if p.quantize == "nf4" else ""
    return f'''# xtuner 0.2 config generated by tunepipe's stages/train_xtuner.py from params.yaml `train`.
# Regenerated on every run of the stage: change params.yaml, not this file.
# Rerun by hand from the repo root (shims: stages/shims.py):
#   .venvs/xtuner/bin/python -m stages.shims xtuner.tools.train {train_file.parent / CONFIG_NAME} \\
#       --work-dir {train_file.parent.parent}
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR, OptimWrapper
from mmengine.visualization import LocalVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.engine.hooks import DatasetInfoHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
pretrained_model_name_or_path = {r(base)}
data_files = {r(str(train_file))}
# input_ids + labels per line, tokenized by tunepipe with the base model's chat template
max_length = {p.max_length}
pack_to_max_length = {p.pack}
use_varlen_attn = {use_varlen_attn}  # packed conversations isolated (flash-attn's varlen kernel)
map_num_proc = {map_num_proc}

# per process; {"packed rows of max_length tokens holding about train.batch_size=" + str(p.batch_size) + " conversations" if p.pack else "conversations"}
batch_size = {plan["batch_rows"]}
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = {p.epochs}
lr = {p.lr!r}
betas = (0.9, 0.999)
weight_decay = {p.weight_decay!r}
max_norm = 1.0  # grad clip
# tunepipe counted {plan["rows_per_epoch"]} rows -> {spe} steps per epoch, {plan["total_steps"]} in all;
# warmup_ratio {p.warmup_ratio} -> {w} warmup steps
warmup_epochs = {warmup_end!r}
seed = {p.seed}

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,{tokenizer_extra}
    padding_side="right",
)

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    use_activation_checkpointing={p.gradient_checkpointing},
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,{llm_extra}
        dtype=torch.{p.dtype},
        attn_implementation={getattr(p, "attn_implementation", "sdpa")!r},{quantization}
    ),
    lora=dict(
        type=LoraConfig,
        r={p.lora.r},
        lora_alpha={p.lora.alpha},
        lora_dropout={p.lora.dropout!r},
        target_modules={r(list(p.lora.target_modules))},
        bias="none",
        task_type="CAUSAL_LM",
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=dict(train=data_files)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=None,
    template_map_fn=None,
    do_dataset_tokenization=False,
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn,
    map_num_proc=map_num_proc,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True, seed=seed),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type={optim_type},
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,{amp}
)

param_scheduler = {schedulers}

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [dict(type=DatasetInfoHook, tokenizer=tokenizer)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    # every train.save_every steps (else once an epoch); the last one is what the adapter is made from
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval={p.save_every or spe}, max_keep_ckpts=2,
                    save_last=True),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend={r(dist_backend)}),  # used by several processes (train.devices) only
)

# per-step scalars (loss, lr) to <work_dir>/<timestamp>/vis_data/scalars.json
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = "INFO"
load_from = None
# True when tunepipe continues a killed run (train.resume auto): mmengine loads <work_dir>/last_checkpoint
resume = {resume}
randomness = dict(seed=seed, deterministic=False)
# window_size=1: every logged loss is that step's loss, not a running mean
log_processor = dict(by_epoch=False, window_size=1, num_digits=6)
'''
