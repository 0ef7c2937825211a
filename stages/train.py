"""train: LoRA SFT of the base model on the train split (placeholder header; being written)."""
from __future__ import annotations

from typing import Literal

from stages.common import Params


class LoraParams(Params):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainParams(Params):
    backend: Literal["hf", "xtuner"] = "hf"
    seed: int = 42
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 8            # conversations per optimizer step (before packing)
    max_length: int = 512          # tokens; longer conversations are truncated
    pack: bool = True              # hf backend: pack samples into rows, isolated per document
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    lora: LoraParams = LoraParams()
