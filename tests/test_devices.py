"""Stages on the GPU when there is one: device/dtype selection, the bf16 merge check, sharded
merged weights, OpenCompass entries on the device, train.step_tokens auto's arithmetic and
gradient checkpointing with LoRA. Runs on the CPU; the selection functions take the device
string, so what a GPU machine would get is asserted here too (benchmarks/gpu_stage_check.py runs
the same code on a GPU)."""
from __future__ import annotations

import ast
import json
import random

import pytest
import torch

from conftest import copy_outputs, run_stage, write_params
from stages.common import StageError, pick_device, pick_dtype
from stages.fit_memory import (auto_step_tokens, fit_line, memory_limit, padded_tokens, pick_budget, preserved,
                               probe_examples, too_small)
from stages.train import LoraParams, TrainParams, build_model, tokenize_conversation
from stages.train_batches import collate, make_batch, plan_steps
from stages.train_step import batch_loss, resolve_step_tokens

GPU = torch.cuda.is_available()
GiB, MiB = 2**30, 2**20


# --- device and dtype selection --------------------------------------------------------------------

def test_auto_dtype_is_bf16_on_cuda_fp32_on_cpu():
    assert pick_dtype("auto", "cuda") == "bfloat16" and pick_dtype("auto", "cuda:1") == "bfloat16"
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("float16", "cuda") == "float16" and pick_dtype("bfloat16", "cpu") == "bfloat16"
    assert pick_device("auto") == ("cuda" if GPU else "cpu") and pick_device("cpu") == "cpu"


def test_merge_settings_per_device():
    from stages.merge import MergeParams, merge_settings

    assert MergeParams().device == "auto" and MergeParams().dtype == "auto"
    assert merge_settings("cuda", "auto") == {"device": "cuda", "dtype": "bfloat16", "check": "max_rel_logit_diff"}
    assert merge_settings("cpu", "auto") == {"device": "cpu", "dtype": "float32", "check": "max_abs_logit_diff"}
    assert merge_settings("cuda", "float32")["check"] == "max_abs_logit_diff"
    with pytest.raises(ValueError, match="max_shard_size"):
        MergeParams(max_shard_size="five gigabytes")


def test_merge_check_tolerance_follows_the_dtype():
    from stages.merge import MergeParams, check_merge, merge_settings

    p = MergeParams()
    fp32, bf16 = merge_settings("cpu", "float32"), merge_settings("cuda", "bfloat16")
    check_merge(5e-4, 1e-6, fp32, p)
    with pytest.raises(StageError, match=r"merge\.max_abs_logit_diff 0\.001"):
        check_merge(2e-3, 1e-6, fp32, p)
    with pytest.raises(StageError, match="max_abs_logit_diff"):
        check_merge(float("nan"), 0.0, fp32, p)
    check_merge(0.2, 0.02, bf16, p)  # bf16 rounding: logits of ~10 move by ~0.1, a small share of the adapter's change
    for rel in (1.0, float("inf"), float("nan")):  # a lost or doubled adapter: rel ~1
        with pytest.raises(StageError, match=r"merge\.max_rel_logit_diff 0\.1.*merge\.dtype float32"):
            check_merge(0.2, rel, bf16, p)


def test_turbomind_settings_per_device():
    from stages.turbomind import TurbomindParams, turbomind_settings

    assert TurbomindParams().device == "auto"
    assert turbomind_settings("cuda", "bfloat16") == {"device": "cuda", "dtype": "bfloat16"}
    assert turbomind_settings("cpu", "float16") == {"device": "cpu", "dtype": "float16"}
    with pytest.raises(StageError, match="turbomind.dtype bfloat16 needs cuda"):
        turbomind_settings("cpu", "bfloat16")
    TurbomindParams(device="auto", dtype="bfloat16")  # decided when the device is known
    with pytest.raises(ValueError, match="needs device cuda"):
        TurbomindParams(device="cpu", dtype="bfloat16")


# --- eval: OpenCompass model entries on the device ----------------------------------------------------

def test_hf_run_settings_per_device():
    from stages.eval_config import hf_run_settings

    assert hf_run_settings("cuda", "auto") == {"model_kwargs": {"device_map": "cuda", "torch_dtype": "bfloat16"},
                                               "run_cfg": {"num_gpus": 1}}
    assert hf_run_settings("cpu", "auto") == {"model_kwargs": {"device_map": "cpu", "torch_dtype": "float32"},
                                              "run_cfg": {"num_gpus": 0}}
    assert hf_run_settings("cuda", "float16")["model_kwargs"]["torch_dtype"] == "float16"


def config_models(path) -> list[dict]:
    """The `models` entries of a written OpenCompass config, read without executing it: literals as
    values, dict(...) calls as dicts, names as their names."""
    def value(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            return {k.arg: value(k.value) for k in node.keywords}
        if isinstance(node, ast.Name):
            return node.id
        return ast.literal_eval(node)

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "models":
            return [value(e) for e in node.value.elts]
    raise AssertionError("no models list")


@pytest.mark.parametrize("device", [pick_device("auto"), "cuda"])
def test_written_config_puts_models_on_the_device(tmp_path, device):
    from stages.eval import EvalParams
    from stages.eval_config import write_config

    p = EvalParams(batch_size=4)  # device auto, dtype auto: what the stage does with params.yaml's defaults
    models = [{"abbr": "merged", "path": str(tmp_path / "models/merged")},
              {"abbr": "turbomind_w4a16_dequant", "path": str(tmp_path / "tm"), "dtype": "float16"}]
    (tmp_path / "eval").mkdir()
    write_config(tmp_path / "eval/cfg.py", tmp_path / "eval", p, models, device, ["<|im_end|>"])
    merged, quant = config_models(tmp_path / "eval/cfg.py")
    if device == "cpu":  # this machine, unless it has a GPU
        assert merged["run_cfg"] == {"num_gpus": 0}
        assert merged["model_kwargs"] == {"device_map": "cpu", "torch_dtype": "float32"}
    else:
        assert merged["run_cfg"] == {"num_gpus": 1}
        assert merged["model_kwargs"] == {"device_map": "cuda", "torch_dtype": "bfloat16"}
    assert quant["model_kwargs"]["torch_dtype"] == "float16" and quant["run_cfg"] == merged["run_cfg"]
    assert merged["batch_size"] == quant["batch_size"] == 4
    assert merged["stop_words"] == ["<|im_end|>"] and merged["meta_template"] == "_chat_meta_template"


def test_eval_defaults_are_auto():
    from stages.eval import EvalParams

    p = EvalParams()
    assert (p.device, p.dtype, p.batch_size) == ("auto", "auto", 8)


# --- merge on the device, in bf16, sharded ----------------------------------------------------------

PLAIN_CHAIN = ("--base", "models/base", "--adapter", "models/adapter")  # no cpt/dpo folders here


@pytest.fixture
def merge_dir(pipeline, tmp_path):
    copy_outputs(pipeline, tmp_path, "models/base", "models/adapter", "data/split/val.jsonl")
    return tmp_path


def test_bf16_merge_is_checked_against_the_adapter_and_sharded(pipeline, merge_dir):
    from safetensors.torch import load_file

    write_params(merge_dir, {"merge": {"dtype": "bfloat16", "max_shard_size": "100KB"}})
    run_stage(merge_dir, "merge", *PLAIN_CHAIN)
    metrics = json.loads((merge_dir / "metrics/merge.json").read_text())
    assert metrics["dtype"] == "bfloat16" and metrics["check"] == "max_rel_logit_diff"
    assert metrics["device"] == pick_device("auto")
    # bf16 rounding moves logits by far more than fp32's 1e-3 bar, yet by a small share of the adapter's change
    assert metrics["max_abs_logit_diff"] > 1e-3 and 0 < metrics["rel_logit_diff"] < 0.05
    out = merge_dir / "models/merged"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == metrics["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # every weight is there, and is the fp32 merge (the pipeline's) up to bf16 rounding of W and of W + BA
    state = {k: v for f in shards for k, v in load_file(f).items()}
    reference = load_file(pipeline / "models/merged/model.safetensors")
    assert set(state) == set(reference)
    for name, w in reference.items():
        assert state[name].dtype == torch.bfloat16
        assert (state[name].float() - w).abs().max() <= 2**-7 * w.abs().max(), name  # 2 half-ulps


def test_merge_check_fails_beyond_the_dtypes_tolerance(merge_dir):
    write_params(merge_dir, {"merge": {"dtype": "bfloat16", "max_rel_logit_diff": 1e-5}})
    with pytest.raises(StageError, match=r"merge \(bfloat16\) changed logits by .* merge\.max_rel_logit_diff 1e-05"):
        run_stage(merge_dir, "merge", *PLAIN_CHAIN)
    write_params(merge_dir, {"merge": {"dtype": "float32", "max_abs_logit_diff": 1e-9}})
    with pytest.raises(StageError, match=r"merge changed logits by .* > merge\.max_abs_logit_diff 1e-09"):
        run_stage(merge_dir, "merge", *PLAIN_CHAIN)
    assert not (merge_dir / "models/merged").exists()


# --- train.step_tokens auto: the arithmetic (the measuring needs CUDA) ------------------------------

def test_fit_line_through_measured_peaks():
    assert fit_line([(512, 10 * GiB + 512 * MiB), (1024, 10 * GiB + 1024 * MiB)]) == pytest.approx((10 * GiB, MiB))
    fixed, slope = fit_line([(1, 3.0), (2, 5.0), (3, 7.5)])  # least squares over three points
    assert slope == pytest.approx(2.25) and fixed == pytest.approx(0.6666667)
    with pytest.raises(ValueError):
        fit_line([(512, 1.0), (512, 2.0)])


def test_memory_limit_honours_the_per_process_fraction():
    total = 140 * GiB
    assert memory_limit(total, free=130 * GiB, held=2 * GiB) == 132 * GiB
    assert memory_limit(total, free=130 * GiB, held=2 * GiB, fraction=40 / 140) == 40 * GiB  # the benchmark's cap
    assert memory_limit(total, free=10 * GiB, held=1 * GiB, fraction=0.5) == 11 * GiB  # others use the card


def test_pick_budget_rounds_down_to_rows_caps_and_backs_off_for_padding():
    fixed, per_token, row = 10 * GiB, MiB, 512
    allowed = 20 * GiB  # room for 10 GiB of steps = 10240 tokens = 20 rows
    assert pick_budget(fixed, per_token, allowed, row, 10**9, lambda b: b) == 10240
    assert pick_budget(fixed, per_token, allowed + 300 * MiB, row, 10**9, lambda b: b) == 10240  # not 10540
    assert pick_budget(fixed, per_token, allowed, row, 3000, lambda b: b) == 3072  # the split holds 3000 tokens
    # packing leaves rows part-empty: batches 10% bigger than their budget must still fit
    budget = pick_budget(fixed, per_token, allowed, row, 10**9, lambda b: int(b * 1.1))
    assert budget == 9216 and budget * 1.1 <= 10240 < (budget + row) * 1.1
    # not even one row: 0, and the stage's error names the key and the numbers
    assert pick_budget(fixed, per_token, fixed + 500 * MiB, row, 10**9, lambda b: b) == 0
    assert pick_budget(fixed, per_token, allowed, row, 10**9, lambda b: b + 20 * row) == 0  # one row pads past it
    message = str(too_small(row, fixed, per_token, 0.9 * 11 * GiB, 11 * GiB, 0.9))
    assert "\n" not in message
    for part in ("train.step_tokens auto", "one row of 512 tokens", "~10.50 GiB", "10.00 GiB fixed",
                 "1024.0 MiB per 1k tokens", "train.step_tokens_memory 0.9 x 11.00 GiB = 9.90 GiB"):
        assert part in message, part
    with pytest.raises(StageError, match="did not grow"):
        pick_budget(fixed, 0.0, allowed, row, 10**9, lambda b: b)


def test_padded_tokens_is_the_size_of_the_batch_collate_builds():
    rng = random.Random(0)
    for _ in range(200):
        row = rng.choice([64, 100, 512])
        lengths = [rng.randint(1, row) for _ in range(rng.randint(1, 40))]
        examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
        for pack in (True, False):
            assert padded_tokens(lengths, pack, row) == collate(examples, pack, row, 0)["input_ids"].numel()


def test_probe_examples_fill_whole_rows():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    for rows, row, max_length in [(1, 1000, 300), (2, 1000, 300), (3, 512, 512)]:
        probe = probe_examples(examples, rows, row, max_length)
        assert max(len(e["input_ids"]) for e in probe) <= max_length
        assert all(e["labels"] == e["input_ids"] for e in probe)
        assert list(collate(probe, True, row, 0)["input_ids"].shape) == [rows, row]


ROW, MAX_LENGTH = 1024, 512


def selection(fixed: float, per_token: float, limit: float, quadratic: float = 0.0, share: float = 0.9):
    """auto_step_tokens over 3000 conversations of 16-512 tokens packed into rows of 1024, with a
    memory model standing in for the GPU: a step's peak is fixed + per_token x (+ quadratic x^2),
    x the tokens of the batch collate builds (as the GPU measure runs the step); past `limit` the
    step runs out of memory. Returns (budget, report, the plan function, the sizes measured)."""
    rng = random.Random(0)
    examples = [{"input_ids": [7] * n, "labels": [7] * n} for n in (rng.randint(16, MAX_LENGTH) for _ in range(3000))]
    p = TrainParams(step_tokens=1, pack_tokens=ROW, max_length=MAX_LENGTH)
    measured = []

    def measure(conversations):
        x = collate(conversations, True, ROW, 0)["input_ids"].numel()
        measured.append(x)
        peak = fixed + per_token * x + quadratic * x * x
        return int(peak) if peak <= limit else None

    def plan(budget):
        return plan_steps(examples, p.model_copy(update={"step_tokens": budget}), random.Random(0))

    budget, report = auto_step_tokens(measure, examples, plan, True, ROW, MAX_LENGTH, share, int(limit))
    return budget, report, plan, measured, examples


def worst_batch(plan, examples, budget: int) -> int:
    return max(padded_tokens([len(examples[i]["input_ids"]) for i in s], True, ROW) for s in plan(budget)[:512])


def test_auto_step_tokens_takes_the_largest_budget_that_fits():
    budget, report, plan, measured, examples = selection(fixed=2 * GiB, per_token=256 * 1024, limit=10 * GiB)
    room = (0.9 * 10 * GiB - 2 * GiB) // (256 * 1024)  # padded tokens a step may have: 28672
    assert measured[:3] == [ROW, ROW, 2 * ROW]  # warm-up, then the two probes
    assert budget % ROW == 0 and worst_batch(plan, examples, budget) <= room < worst_batch(plan, examples, budget + ROW)
    assert budget > 0.8 * room  # packing costs a little, not a lot
    assert report["tries"] == 1 and report["verified_peak_mb"] <= report["limit_mb"]
    assert report["per_1k_tokens_mb"] == pytest.approx(256.0) and report["fixed_mb"] == pytest.approx(2048.0)
    assert report["probe_tokens"] == [ROW, 2 * ROW] and not report["capped_at_train_tokens"]


def test_auto_step_tokens_backs_off_when_the_extrapolation_is_wrong():
    # memory grows faster than the two small probes show: the first pick runs out of memory
    budget, report, plan, measured, examples = selection(fixed=2 * GiB, per_token=256 * 1024, limit=10 * GiB,
                                                         quadratic=2.0)
    assert report["tries"] >= 2 and budget % ROW == 0
    x = measured[-1]  # the verified step
    assert 2 * GiB + 256 * 1024 * x + 2.0 * x * x <= 10 * GiB


def test_auto_step_tokens_stops_before_running_out_when_one_row_does_not_fit():
    with pytest.raises(StageError, match=r"train\.step_tokens auto: one row of 1024 tokens needs ~8\.\d\d GiB"):
        selection(fixed=8 * GiB, per_token=256 * 1024, limit=9 * GiB)  # runs, but past 0.9 x 9 GiB
    with pytest.raises(StageError, match=r"train\.step_tokens auto: one row of 1024 tokens ran out of GPU memory"):
        selection(fixed=10 * GiB, per_token=256 * 1024, limit=9 * GiB)
    # one row runs, two do not: one row it is
    budget, report, *_ = selection(fixed=8 * GiB, per_token=GiB / 1024, limit=9.5 * GiB, share=1.0)
    assert budget == ROW and report["tries"] == 0


def test_probe_steps_leave_weights_and_random_numbers_as_they_were():
    layer = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    with preserved(layer):
        layer(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        assert not torch.equal(layer.weight, before["weight"])
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    assert layer.weight.grad is None and torch.equal(torch.rand(3), expected)


def test_step_tokens_auto_on_cpu_falls_back_to_batch_size(capsys):
    p = TrainParams(step_tokens="auto", batch_size=8)
    resolved, report = resolve_step_tokens(None, [], p, 0, torch.device("cpu"))
    assert resolved.step_tokens is None and report == {"step_tokens": None, "step_tokens_auto": "no GPU: batch_size"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "train.batch_size=8" in lines[0]
    fixed = TrainParams(step_tokens=4096)
    assert resolve_step_tokens(None, [], fixed, 0, torch.device("cpu")) == (fixed, {"step_tokens": 4096})
    with pytest.raises(ValueError):
        TrainParams(step_tokens="max")
    from stages.train_xtuner import unsupported_options

    assert "train.step_tokens='auto'" in unsupported_options(p)  # xtuner plans its own batches


# --- gradient checkpointing with LoRA ------------------------------------------------------------

@pytest.mark.parametrize("speed", [{}, {"attn_implementation": "varlen", "loss_chunk_size": 64}],
                         ids=["packed-sdpa", "packed-varlen-chunked-loss"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_lora_gradients(pipeline, speed):
    from transformers import AutoTokenizer

    from stages.common import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    examples = [tokenize_conversation(tokenizer, r["messages"], 512)
                for r in read_jsonl(pipeline / "data/split/train.jsonl")[:12]]
    p = TrainParams(lora=LoraParams(dropout=0.1), pack_tokens=1024, **speed)
    batch = make_batch(examples, p, tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["input_ids"].shape[0] < len(examples)  # packed
    runs = {}
    for checkpointing in (False, True):
        q = p.model_copy(update={"gradient_checkpointing": checkpointing})
        torch.manual_seed(0)
        model = build_model(str(pipeline / "models/base"), {"revision": None}, q, torch.device("cpu"))
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "lora_B" in name:
                    w.normal_(0, 0.05)
        model.train()
        calls = []
        # pre-hooks inside the layer: transformers checkpoints the layer's forward (outside the layer's own
        # hooks), and the recompute stops once it has what backward needs (before the MLP's forward returns)
        layer = model.get_base_model().model.layers[0]
        for module in (layer.self_attn, layer.mlp):
            module.register_forward_pre_hook(lambda *args: calls.append(1))
        torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays the RNG)
        loss = batch_loss(model, batch, q)
        loss.backward()
        grads = {n: w.grad for n, w in model.named_parameters() if w.requires_grad}
        runs[checkpointing] = loss.item(), grads, len(calls)
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = runs[False], runs[True]
    assert (calls, calls_ckpt) == (2, 4)  # the layer really ran again in the backward pass
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert len(grads) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    for name, g in grads.items():
        assert grads_ckpt[name] is not None and grads_ckpt[name].abs().sum() > 0, name
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-4, atol=1e-7), name
