"""turbomind: quantize the merged model to the W4A16 AWQ artifact that lmdeploy's TurboMind serves.

Runs in .venvs/lmdeploy (lmdeploy pins torch<=2.12.1 and peft<=0.14, so it has its own env).
The quantizer is lmdeploy's own Python API (`lmdeploy.lite.apis.auto_awq`), fed with the
project's calibration rows (the train split, rendered with the model's chat template) instead of
the wikitext/c4 loaders that lmdeploy's CLI downloads from a hub. TurboMind converts AWQ weights
at load time and needs CUDA for that, so on CPU this stage writes the artifact and checks it:

    models/turbomind/
      config.json                 + quantization_config {quant_method: awq, bits: 4, group_size, version: gemm}
      model.safetensors           int32 qweight/qzeros + fp16 scales per linear layer of every decoder
                                  layer; embeddings, norms and lm_head stay fp16
      tokenizer files, generation_config.json (copied from the merged model)
      lmdeploy_chat_template.json ChatML models only: lmdeploy ChatTemplateConfig (stop word <|im_end|>),
                                  for `--chat-template`; named so that transformers does not mistake
                                  it for its legacy processor `chat_template.json`

Serve on a GPU machine:  lmdeploy serve api_server models/turbomind --model-format awq
(without --chat-template lmdeploy renders with the tokenizer's own template, the base model's,
and stops at its end-of-turn token; see `check_chat_templates` for the json's one limitation).

Quantization error (metrics/turbomind.json): the artifact is dequantized here (unpacked the way
TurboMind's AWQ loader unpacks it) and its logits compared with the merged fp model's on held-out
train rows that were not used for calibration (in fp32, on the same device as the calibration).

Device (turbomind_settings): turbomind.device auto calibrates on the GPU when there is one, else
on the CPU; turbomind.dtype float16 (AWQ's own) works on both, bfloat16 needs cuda (lmdeploy's
loader asserts it), so bfloat16 with no GPU stops with a one-line error.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stages.awq import dequantize_linear
from stages.chat_template import render_chat, stop_token_ids
from stages.common import (
    CHAT_TEMPLATE,
    IM_END,
    STOP_TOKEN,
    Params,
    StageError,
    atomic_path,
    load_params,
    pick_device,
    read_jsonl,
    render_chatml,
    run_stage,
    write_json,
)
from stages.remote_code import load_kwargs

CHAT_TEMPLATE_FILE = "lmdeploy_chat_template.json"
# head sizes TurboMind has attention kernels for (src/turbomind/kernels/attention/codegen in 0.18)
TURBOMIND_HEAD_DIMS = {64, 128, 192, 256, 576}


class TurbomindParams(Params):
    w_bits: Literal[4] = 4                 # TurboMind's AWQ kernels are 4-bit
    w_group_size: Literal[128] = 128       # TurboMind 0.18 loads AWQ with group 128 only; every
                                           # linear's in_features must divide by it
    calib_samples: int = Field(128, ge=1)  # calibration blocks of calib_seqlen tokens (at most)
    calib_seqlen: int = Field(512, ge=16)  # tokens per calibration block
    search_scale: bool = False             # AWQ ratio search (slower); False: smooth with alpha 0.5
    batch_size: int = Field(1, ge=1)       # calibration blocks per forward
    dtype: Literal["float16", "bfloat16"] = "float16"  # calibration/artifact dtype (fp16: AWQ's own)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible, else cpu
    eval_rows: int = Field(8, ge=1)        # held-out train rows for the logit error (not calibrated on)
    seed: int = 0                          # which rows are held out

    @model_validator(mode="after")
    def _bf16_needs_cuda(self):
        if self.dtype == "bfloat16" and self.device == "cpu":
            raise ValueError("dtype bfloat16 needs device cuda (lmdeploy's loader asserts it)")
        return self


def turbomind_settings(device: str, dtype: str) -> dict:
    """Where and in what lmdeploy calibrates, for a device as pick_device returns it ("cuda" when
    a GPU is there, else "cpu") and turbomind.dtype."""
    if dtype == "bfloat16" and not device.startswith("cuda"):
        raise StageError(f"turbomind.dtype bfloat16 needs cuda, but turbomind.device resolved to {device} "
                         "(no GPU visible): use float16")
    return {"device": device, "dtype": dtype}


# --- load ---------------------------------------------------------------------------------------

def split_rows(rows: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(calibration rows, held-out rows): a seeded shuffle, the first `eval_rows` held out."""
    if len(rows) <= eval_rows:
        raise StageError(f"need more than turbomind.eval_rows={eval_rows} train rows, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = [rows[i] for i in order[:eval_rows]]
    calib = [rows[i] for i in order[eval_rows:]]
    return calib, held


def render(tokenizer, row: dict) -> str:
    """A split row as the chat template renders it, with its tools (stages/chat_template.py)."""
    return render_chat(tokenizer, row["messages"], row.get("tools"))


def calibration_blocks(tokenizer, rows: list[dict], samples: int, seqlen: int):
    """lmdeploy's own loaders (get_pileval, get_gsm8k, ...) concatenate the tokenized samples and
    cut them into blocks of `seqlen` tokens; the same here, on the rendered conversations."""
    import torch

    ids: list[int] = []
    for row in rows:
        ids += tokenizer(render(tokenizer, row), add_special_tokens=False)["input_ids"]
        if len(ids) >= samples * seqlen:
            break
    if not ids:
        raise StageError("no calibration tokens: the train split rendered to nothing")
    seqlen = min(seqlen, len(ids))          # a small split: one shorter block rather than none
    n = min(samples, len(ids) // seqlen)
    flat = torch.tensor(ids[: n * seqlen], dtype=torch.long)
    return [block.unsqueeze(0) for block in flat.split(seqlen)]


# --- quantize (lmdeploy) ------------------------------------------------------------------------

@contextlib.contextmanager
def local_calibration_data(blocks):
    """auto_awq -> calibrate() takes its data from lmdeploy.lite.apis.calibrate.get_calib_loaders,
    which downloads a named dataset. Hand it the local blocks instead, for the duration."""
    import importlib

    calibrate_mod = importlib.import_module("lmdeploy.lite.apis.calibrate")
    if not hasattr(calibrate_mod, "get_calib_loaders"):
        raise StageError("lmdeploy.lite.apis.calibrate.get_calib_loaders is gone: lmdeploy changed, "
                         "adapt stages/turbomind.py")
    original = calibrate_mod.get_calib_loaders
    calibrate_mod.get_calib_loaders = lambda *args, **kwargs: list(blocks)
    try:
        yield
    finally:
        calibrate_mod.get_calib_loaders = original


def quantize(merged: Path, out: Path, blocks, p: TurbomindParams, settings: dict) -> None:
    from lmdeploy.lite.apis.auto_awq import auto_awq

    with local_calibration_data(blocks):
        auto_awq(
            str(merged),
            work_dir=str(out),
            calib_dataset="pileval",  # a name calibrate() accepts; the data is `blocks`
            calib_samples=len(blocks),
            calib_seqlen=blocks[0].shape[1],
            batch_size=p.batch_size,
            w_bits=p.w_bits,
            w_sym=False,  # asymmetric, with zero points: AWQ gemm as TurboMind loads it
            w_group_size=p.w_group_size,
            search_scale=p.search_scale,
            device=settings["device"],
            dtype=settings["dtype"],
            trust_remote_code=bool(load_kwargs(merged)),  # a merged model that ships its code
        )


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def finish_artifact(merged: Path, out: Path) -> None:
    """Tidy what auto_awq wrote into a servable model dir: its weights and config.json, and every
    other file (tokenizer, chat template, generation config) byte for byte from the merged model.
    (auto_awq re-saves the tokenizer through AutoTokenizer, and transformers 5 rebuilds a qwen2
    tokenizer's normalizer and pre-tokenizer on load: the copy keeps the tokenizer the merged
    model was trained and evaluated with.)"""
    import json

    for f in out.iterdir():
        if f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES[:2]):
            f.unlink()  # tokenizer re-save, calibration stats (inputs_stats.pth, outputs_stats.pth)
    for f in merged.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, out / f.name)
    # lmdeploy's loader sets use_cache=False for calibration and saves it; restore the merged value
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    merged_config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    config["use_cache"] = merged_config.get("use_cache", True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer_template(merged) == CHAT_TEMPLATE:  # lmdeploy's json format can express ChatML
        write_lmdeploy_chat_template(out / CHAT_TEMPLATE_FILE)


def tokenizer_template(model_dir: Path) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).chat_template


def write_lmdeploy_chat_template(path: Path) -> None:
    """The project's ChatML (stages.common.CHAT_TEMPLATE) in lmdeploy's ChatTemplateConfig fields
    (lmdeploy/model.py BaseChatTemplate): a message renders as box + content + end."""
    from lmdeploy.model import ChatTemplateConfig

    ChatTemplateConfig(
        model_name="tunepipe-chatml",
        system="<|im_start|>system\n", eosys=f"{IM_END}\n",
        user="<|im_start|>user\n", eoh=f"{IM_END}\n",
        assistant="<|im_start|>assistant\n", eoa=IM_END, separator="\n",
        tool="<|im_start|>tool\n", eotool=f"{IM_END}\n",
        capability="chat", stop_words=[STOP_TOKEN],
    ).to_json(str(path))


# --- check --------------------------------------------------------------------------------------

def check_layout(out: Path, p: TurbomindParams) -> tuple[dict, int]:
    """What TurboMind's loader requires of an AWQ checkpoint (AWQFormat.accepts, get_tm_config):
    returns (the dequantized state dict, number of quantized linears)."""
    import json

    import torch
    from safetensors.torch import load_file

    from lmdeploy.turbomind.supported_models import is_supported

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if not is_supported(str(out), **load_kwargs(out)):
        raise StageError(f"{out}: lmdeploy says TurboMind does not support {config['architectures']}")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in TURBOMIND_HEAD_DIMS:
        print(f"[turbomind] warning: head_dim {head_dim} has no TurboMind attention kernel "
              f"({sorted(TURBOMIND_HEAD_DIMS)}); the artifact is checked here but will not serve on TurboMind")
    qc = config.get("quantization_config") or {}
    want = {"quant_method": "awq", "version": "gemm", "bits": p.w_bits, "group_size": p.w_group_size}
    if {k: qc.get(k) for k in want} != want:
        raise StageError(f"{out}/config.json: quantization_config {qc} is not {want}")
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    prefixes = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not prefixes:
        raise StageError(f"{out}: no AWQ qweight tensors written")
    for prefix in prefixes:
        qw, s, qz = (state.pop(f"{prefix}.{n}") for n in ("qweight", "scales", "qzeros"))
        ok = (qw.dtype == torch.int32 and qz.dtype == torch.int32 and s.dtype.is_floating_point
              and qw.shape[-1] * 8 == s.shape[-1] and qw.shape[0] == s.shape[0] * p.w_group_size)
        if not ok:
            raise StageError(f"{prefix}: qweight {qw.dtype}{list(qw.shape)} scales {s.dtype}{list(s.shape)} "
                             f"qzeros {qz.dtype}{list(qz.shape)} is not TurboMind's AWQ gemm layout")
        state[f"{prefix}.weight"] = dequantize_linear(qw, qz, s, p.w_group_size)
    return state, len(prefixes)


def check_chat_templates(out: Path, tokenizer, rows: list[dict]) -> None:
    """The ways lmdeploy can render prompts for this artifact must give the base model's template:
    - default (no --chat-template): lmdeploy picks its 'hf' template = the tokenizer's template,
      and must stop at the template's end-of-turn token;
    - --chat-template lmdeploy_chat_template.json (written for ChatML only): exact for conversations
      that carry a system message. lmdeploy 0.18 turns a null meta_instruction into '' and so
      prepends an empty system turn to conversations without one; its json cannot turn that off."""
    from lmdeploy.model import ChatTemplateConfig, HFChatTemplate, get_chat_template

    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    default = get_chat_template(str(out))
    if not isinstance(default, HFChatTemplate) or stops[0] not in (default.stop_words or []):
        raise StageError(f"lmdeploy would not render {out} with the tokenizer's chat template and stop at "
                         f"{stops[0]} (got {type(default).__name__}, stop words {default.stop_words})")
    json_file = out / CHAT_TEMPLATE_FILE
    from_json = ChatTemplateConfig.from_json(str(json_file)).chat_template() if json_file.exists() else None
    for row in rows:
        msgs = row["messages"]
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        want = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if default.messages2prompt(prompt) != want:
            raise StageError(f"lmdeploy's default template renders row {row['id']} differently")
        with_system = prompt if prompt[0]["role"] == "system" else [{"role": "system", "content": "x"}, *prompt]
        if from_json and from_json.messages2prompt(with_system) != render_chatml(with_system, add_generation_prompt=True):
            raise StageError(f"{json_file} renders row {row['id']} differently")
    if from_json and from_json.stop_words != [STOP_TOKEN]:
        raise StageError(f"{json_file}: stop words {from_json.stop_words}, want [{STOP_TOKEN}]")


def quant_error(merged: Path, out: Path, state: dict, tokenizer, rows: list[dict], seqlen: int,
                device: str = "cpu") -> dict:
    """Logits of the merged fp model vs the dequantized artifact on held-out rows (fp32 compute, on device)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, **load_kwargs(merged)).to(device).eval()
    config = AutoConfig.from_pretrained(out, **load_kwargs(out))
    config.quantization_config = None
    del config.quantization_config
    q = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **load_kwargs(out)).eval()
    missing, unexpected = q.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise StageError(f"{out}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    q.tie_weights()
    q.to(device)

    rel, kl, agree, nll_fp, nll_q, tokens = [], [], 0, 0.0, 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids = tokenizer(render(tokenizer, row), add_special_tokens=False,
                            return_tensors="pt")["input_ids"][:, :seqlen].to(device)
            lf, lq = fp(ids).logits[0].float(), q(ids).logits[0].float()
            rel.append(((lq - lf).norm() / lf.norm().clamp_min(1e-12)).item())
            logp_f, logp_q = F.log_softmax(lf, -1), F.log_softmax(lq, -1)
            kl.append((logp_f.exp() * (logp_f - logp_q)).sum(-1).mean().item())
            agree += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
            target = ids[0, 1:]
            nll_fp += F.nll_loss(logp_f[:-1], target, reduction="sum").item()
            nll_q += F.nll_loss(logp_q[:-1], target, reduction="sum").item()
            tokens += ids.shape[1]
    n_next = tokens - len(rows)
    return {
        "logits_rel_error_mean": sum(rel) / len(rel),
        "logits_rel_error_max": max(rel),
        "kl_fp_to_quant_mean": sum(kl) / len(kl),
        "top1_agreement": agree / tokens,
        "nll_fp": nll_fp / max(n_next, 1),
        "nll_quant": nll_q / max(n_next, 1),
        "eval_rows": len(rows),
        "eval_tokens": tokens,
    }


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merged", type=Path, default=Path("models/merged"))
    ap.add_argument("--train", type=Path, default=Path("data/split/train.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("models/turbomind"))
    ap.add_argument("--metrics", type=Path, default=Path("metrics/turbomind.json"))
    args = ap.parse_args()
    p = load_params("turbomind", TurbomindParams)
    settings = turbomind_settings(pick_device(p.device), p.dtype)
    for path in (args.merged / "config.json", args.train):
        if not path.exists():
            raise StageError(f"{path}: not found")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.merged, **load_kwargs(args.merged))
    calib_rows, held_rows = split_rows(read_jsonl(args.train), p.eval_rows, p.seed)
    blocks = calibration_blocks(tokenizer, calib_rows, p.calib_samples, p.calib_seqlen)
    print(f"[turbomind] calibrating on {len(blocks)} x {blocks[0].shape[1]} tokens "
          f"from {len(calib_rows)} rows; {len(held_rows)} rows held out; on {settings['device']} in {settings['dtype']}")

    merged_bytes = weights_bytes(args.merged)
    with atomic_path(args.out, is_dir=True) as out:
        quantize(args.merged, out, blocks, p, settings)
        finish_artifact(args.merged, out)
        state, n_linear = check_layout(out, p)
        check_chat_templates(out, tokenizer, held_rows)
        metrics = quant_error(args.merged, out, state, tokenizer, held_rows, p.calib_seqlen, settings["device"])
        metrics.update({
            "quantized_linears": n_linear,
            "calib_blocks": len(blocks),
            "calib_tokens": sum(b.numel() for b in blocks),
            "weights_mb": weights_bytes(out) / 2**20,
            "compression_vs_merged": merged_bytes / weights_bytes(out),
        })
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise StageError(f"quantization error is not finite: {bad}")
        write_json(args.metrics, metrics)
    print(f"[turbomind] {n_linear} linears -> AWQ W{p.w_bits} g{p.w_group_size}; "
          f"logits rel error {metrics['logits_rel_error_mean']:.4f}, "
          f"top-1 agreement {metrics['top1_agreement']:.3f} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
