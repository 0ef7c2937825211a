"""turbomind stage: W4A16 AWQ artifact from lmdeploy's own quantizer, on a tiny Qwen2 model.

The stage runs in .venvs/lmdeploy (a subprocess, as dvc runs it); the assertions run here.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LMDEPLOY_PY = ROOT / ".venvs" / "lmdeploy" / "bin" / "python"
sys.path.insert(0, str(ROOT))

from stages.common import IM_END, STOP_TOKEN, render_chatml  # noqa: E402

pytestmark = pytest.mark.skipif(
    not LMDEPLOY_PY.exists(),
    reason=".venvs/lmdeploy is missing: build it with `TUNEPIPE_ENVS=lmdeploy ./setup.sh`",
)

GROUP = 128
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TEXTS = [
    "What is the usual adult dose of paracetamol?",
    "Take 500 mg to 1 g every four to six hours, at most 4 g in a day.",
    "Can I take ibuprofen with a cold?",
    "Yes, for fever and pain, with food; avoid it with stomach ulcers or kidney disease.",
    "头痛三天了，需要看医生吗？",
    "如果头痛持续或加重，伴有发热、呕吐，请及时就医。",
    "How should insulin pens be stored?",
    "Unopened pens in the fridge; the pen in use at room temperature for up to four weeks.",
]

CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]


def build_tiny_model(path: Path, layers: int = 2) -> None:
    """The pipeline's demo model (stages/base.py), smaller: Qwen2ForCausalLM hidden 128 /
    intermediate 384 / 4 heads / 2 KV heads, byte-level BPE with the ChatML specials, ChatML chat
    template, eos <|im_end|>; a few pre-training steps so activations have some structure."""
    from stages.base import DemoModelParams, build_tiny_model as build, save_portable_tokenizer

    params = DemoModelParams(vocab_size=600, num_layers=layers, pretrain_steps=30, pretrain_batch=8)
    model, tokenizer, _ = build(TEXTS * 3, params, seed=0, progress=False)
    model.save_pretrained(path, safe_serialization=True)
    save_portable_tokenizer(tokenizer, path)


def write_train(path: Path, n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = TEXTS[(2 * i) % len(TEXTS)], TEXTS[(2 * i + 1) % len(TEXTS)]
        messages = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a careful pharmacist."})
        rows.append({"id": f"r{i}", "source": {"file": "demo", "row": i}, "messages": messages, "meta": {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


PARAMS = f"""
turbomind:
  w_bits: 4
  w_group_size: {GROUP}
  calib_samples: 16
  calib_seqlen: 64
  search_scale: false
  eval_rows: 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("turbomind")
    build_tiny_model(tmp / "merged")
    write_train(tmp / "train.jsonl")
    (tmp / "params.yaml").write_text(PARAMS, encoding="utf-8")
    env = {**os.environ, "TUNEPIPE_PARAMS": str(tmp / "params.yaml"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(LMDEPLOY_PY), "-m", "stages.turbomind", "--merged", str(tmp / "merged"),
         "--train", str(tmp / "train.jsonl"), "--out", str(tmp / "turbomind"),
         "--metrics", str(tmp / "metrics.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def test_config_is_awq_w4_gemm(run):
    config = json.loads((run / "turbomind" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm"
    assert qc["bits"] == 4 and qc["group_size"] == GROUP and qc["zero_point"] is True
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    gen = json.loads((run / "turbomind" / "generation_config.json").read_text())
    assert config["eos_token_id"] in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list)
                                      else [gen["eos_token_id"]])
    assert not list((run / "turbomind").glob("*.pth")), "calibration stats left in the artifact"
    assert not list(run.glob(".turbomind.*")), "temporary dir left behind"


def test_every_linear_is_packed_int4(run):
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in (run / "turbomind").glob("*.safetensors"):
        state.update(load_file(f))
    config = json.loads((run / "turbomind" / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        for lin in LINEARS:
            prefix = f"model.layers.{layer}.{lin}"
            assert f"{prefix}.weight" not in state, f"{prefix} left unquantized"
            qw, s, qz = state[f"{prefix}.qweight"], state[f"{prefix}.scales"], state[f"{prefix}.qzeros"]
            assert qw.dtype == qz.dtype == torch.int32 and s.dtype == torch.float16, prefix
            in_f, out_f = qw.shape[0], s.shape[1]
            assert qw.shape == (in_f, out_f // 8) and s.shape == (in_f // GROUP, out_f), prefix
            assert qz.shape == (in_f // GROUP, out_f // 8), prefix
    assert state["model.embed_tokens.weight"].dtype == torch.float16


def test_chat_template_json_is_project_chatml(run):
    cfg = json.loads((run / "turbomind" / "lmdeploy_chat_template.json").read_text())
    assert cfg["stop_words"] == [STOP_TOKEN]
    # lmdeploy's BaseChatTemplate renders a message as box + content + end
    box = {"system": cfg["system"], "user": cfg["user"], "assistant": cfg["assistant"]}
    end = {"system": cfg["eosys"], "user": cfg["eoh"], "assistant": cfg["eoa"] + cfg["separator"]}
    rendered = "".join(box[m["role"]] + m["content"] + end[m["role"]] for m in CONV) + cfg["assistant"]
    assert rendered == render_chatml(CONV, add_generation_prompt=True)
    # the tokenizer that travels with the artifact (lmdeploy's default 'hf' template) is ChatML
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "turbomind")
    assert tok.eos_token == IM_END
    assert tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == \
        render_chatml(CONV, add_generation_prompt=True)


def lmdeploy_render(template_json: Path, conv: list[dict]) -> tuple[str, list[str]]:
    """Render `conv` with lmdeploy's own ChatTemplateConfig.from_json, in the lmdeploy env."""
    code = (
        "import json,sys; from lmdeploy.model import ChatTemplateConfig; "
        "t = ChatTemplateConfig.from_json(sys.argv[1]).chat_template(); "
        "print(json.dumps([t.messages2prompt(json.loads(sys.argv[2])), t.stop_words]))"
    )
    proc = subprocess.run([str(LMDEPLOY_PY), "-c", code, str(template_json), json.dumps(conv)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompt, stop = json.loads(proc.stdout.strip().splitlines()[-1])
    return prompt, stop


def test_chat_template_json_through_lmdeploy(run):
    prompt, stop = lmdeploy_render(run / "turbomind" / "lmdeploy_chat_template.json", CONV)
    assert prompt == render_chatml(CONV, add_generation_prompt=True)
    assert stop == [STOP_TOKEN]


@pytest.mark.xfail(strict=True, reason=(
    "lmdeploy 0.18 BaseChatTemplate turns a null meta_instruction into '' and prepends an empty "
    "system turn to conversations without one; its json cannot switch that off. Serve without "
    "--chat-template (lmdeploy then uses the tokenizer's ChatML). If this passes, lmdeploy fixed "
    "it: drop the caveat in stages/turbomind.py and this marker."))
def test_chat_template_json_without_system_message(run):
    prompt, _ = lmdeploy_render(run / "turbomind" / "lmdeploy_chat_template.json", CONV[1:])
    assert prompt == render_chatml(CONV[1:], add_generation_prompt=True)


def test_quant_error_is_small_and_finite(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["quantized_linears"] == 2 * len(LINEARS)
    assert 0 < metrics["logits_rel_error_mean"] <= metrics["logits_rel_error_max"] < 0.5, metrics
    assert metrics["top1_agreement"] > 0.5, metrics
    assert metrics["eval_rows"] == 4 and metrics["calib_blocks"] >= 1


def test_artifact_tokenizer_is_the_merged_one(run):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / "turbomind" / name).read_bytes() == (run / "merged" / name).read_bytes(), name
    text = render_chatml([{"role": "user", "content": TEXTS[4] + " 12 tablets, it's 3pm"}])
    ids = [AutoTokenizer.from_pretrained(run / d)(text)["input_ids"] for d in ("merged", "turbomind")]
    assert ids[0] == ids[1]


def test_dequantize_inverts_lmdeploys_packing():
    """stages.awq.dequantize_linear (TurboMind's unpack order) against lmdeploy's own packer."""
    code = """
import torch
from lmdeploy.lite.quantization import WeightQuantizer
from lmdeploy.lite.quantization.awq import pseudo_quantize_tensor
from lmdeploy.lite.quantization.modules import WeightOnlyQLinear
from lmdeploy.lite.utils import QParams
from stages.awq import dequantize_linear
torch.manual_seed(0)
fc = torch.nn.Linear(256, 96).half()
want = pseudo_quantize_tensor(fc.weight.data.clone(), 4, 128).float()
q, s, z = pseudo_quantize_tensor(fc.weight.data, 4, 128, return_scale_zeros=True)
fc.weight.data = q
ql = WeightOnlyQLinear.from_linear(fc, WeightQuantizer(4, False, 'per_group', 128), qparams=QParams(s, z))
print((dequantize_linear(ql.qweight, ql.qzeros, ql.scales, 128) - want).abs().max().item())
"""
    proc = subprocess.run([str(LMDEPLOY_PY), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-3  # fp16 rounding only


def test_bad_params_fail_clearly(tmp_path):
    (tmp_path / "params.yaml").write_text("turbomind:\n  w_group_size: 100\n", encoding="utf-8")
    proc = subprocess.run([str(LMDEPLOY_PY), "-m", "stages.turbomind", "--merged", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "TUNEPIPE_PARAMS": str(tmp_path / "params.yaml")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "turbomind.w_group_size" in proc.stderr and "Traceback" not in proc.stderr
