"""xtuner backend parity (stages/xtuner_config.py), at the level of the generated config and command:
packing only with varlen attention (else off with a warning), QLoRA's BitsAndBytesConfig when
train.quantize is nf4, and DeepSpeed ZeRO-2 through xtuner's own --deepspeed. These run on CPU in
the core env; tests/test_train_xtuner.py runs xtuner itself."""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest

from stages.common import StageError
from stages.train import TrainParams
from stages.xtuner_config import check_quantize, render_config, resolve_packing, train_args

ROOT = Path(__file__).resolve().parents[1]
PLAN = {"rows_per_epoch": 20, "batch_rows": 4, "tokens_per_epoch": 900, "steps_per_epoch": 5, "total_steps": 10,
        "warmup_steps": 0}


def config_of(p: TrainParams, **kw) -> str:
    text = render_config(p, base="models/base", revision=None, train_file=Path("w/inputs/train.jsonl"), plan=PLAN,
                         map_num_proc=1, use_amp=False, **kw)
    ast.parse(text)  # valid Python, as mmengine's Config.fromfile needs
    return text


def assigned(text: str, name: str):
    """The literal value a top-level `name = ...` of the config assigns."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not assigned")


def test_pack_without_varlen_attention_trains_unpacked_with_a_warning():
    p, varlen, warning = resolve_packing(TrainParams(backend="xtuner", pack=True), cuda=False)
    assert (p.pack, varlen) == (False, False)
    assert warning.startswith("warning: train.pack ignored") and "\n" not in warning
    text = config_of(p, use_varlen_attn=varlen)
    assert assigned(text, "pack_to_max_length") is False and assigned(text, "use_varlen_attn") is False
    # pack off asked for: nothing to warn about
    assert resolve_packing(TrainParams(backend="xtuner", pack=False), cuda=True)[1:] == (False, "")


def test_pack_with_varlen_attention_isolates_packed_conversations(monkeypatch):
    import stages.xtuner_config as xc

    monkeypatch.setattr(xc, "varlen_attention_available", lambda cuda: cuda)  # flash-attn on a GPU
    p, varlen, warning = resolve_packing(TrainParams(backend="xtuner", pack=True), cuda=True)
    assert (p.pack, varlen, warning) == (True, True, "")
    text = config_of(p, use_varlen_attn=varlen)
    assert assigned(text, "pack_to_max_length") is True and assigned(text, "use_varlen_attn") is True
    # the dataset, the collate function and the model all take the same switch
    assert text.count("use_varlen_attn=use_varlen_attn") == 3


def test_nf4_loads_the_base_in_4_bits_with_xtuners_qlora_settings():
    text = config_of(TrainParams(backend="xtuner", quantize="nf4", dtype="bfloat16", pack=False))
    llm = text[text.index("llm=dict("):text.index("lora=dict(")]
    assert "quantization_config=dict(\n            type=BitsAndBytesConfig," in llm
    for setting in ("load_in_4bit=True", 'bnb_4bit_quant_type="nf4"', "bnb_4bit_use_double_quant=True",
                    "bnb_4bit_compute_dtype=torch.bfloat16"):
        assert setting in llm
    assert "quantization_config" not in config_of(TrainParams(backend="xtuner", pack=False))


def test_nf4_on_cpu_is_one_clear_error():
    with pytest.raises(StageError, match=r"train.quantize=nf4 \(QLoRA\) needs a CUDA GPU"):
        check_quantize(TrainParams(backend="xtuner", quantize="nf4"), cuda=False)
    check_quantize(TrainParams(backend="xtuner"), cuda=False)  # none: nothing to check


def test_deepspeed_zero2_goes_through_xtuners_own_flag():
    assert train_args(Path("w/inputs/c.py"), Path("w"), Path("w/inputs/deepspeed_zero2.json")) == [
        "w/inputs/c.py", "--work-dir", "w", "--deepspeed", "w/inputs/deepspeed_zero2.json"]
    assert train_args(Path("c.py"), Path("w")) == ["c.py", "--work-dir", "w"]


def test_deepspeed_json_is_xtuners_zero2_in_the_pipelines_precision():
    python = ROOT / ".venvs/xtuner/bin/python"
    if not python.exists():
        pytest.skip(".venvs/xtuner is missing: build it with `TUNEPIPE_ENVS=xtuner ./setup.sh`")
    code = ("import json; from stages.train import TrainParams; from stages.xtuner_config import deepspeed_config; "
            "print(json.dumps([deepspeed_config(TrainParams(deepspeed='zero2', dtype=d), cuda=c, zero='zero2') "
            "for d, c in (('float32', False), ('bfloat16', True))]))")
    out = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cpu, gpu = json.loads(out.splitlines()[-1])
    assert cpu["zero_optimization"]["stage"] == 2
    assert (cpu["fp16"]["enabled"], cpu["bf16"]["enabled"]) == (False, False)  # DeepSpeed has no fp16 on CPU
    assert cpu["train_micro_batch_size_per_gpu"] == "auto"  # xtuner fills it in from the config
    assert (gpu["fp16"]["enabled"], gpu["bf16"]["enabled"]) == (False, True)
