"""The train stage's speed options compute the same loss as the plain path (CPU, tiny model).

The GPU kernels themselves (FlashAttention varlen, torch.compile) run in benchmarks/train_throughput.py
on the lent GPU; here the same functions run their CPU paths: varlen attention falls back to
causal SDPA per document, the chunked loss is the same code.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import REPO
from stages.common import read_jsonl
from stages.train import IGNORE, LoraParams, TrainParams, build_model, tokenize_conversation
from stages.train_batches import collate, make_batch, plan_steps, varlen_kwargs
from stages.train_step import batch_loss

PLAIN = TrainParams(lora=LoraParams(dropout=0.0))  # the stage's defaults, without dropout noise


def speed(**changes) -> TrainParams:
    return PLAIN.model_copy(update=changes)


@pytest.fixture(scope="module")
def tiny(pipeline):
    """The pipeline's demo base with LoRA adapters whose B is non-zero (so they matter), and 12
    conversations of the train split."""
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    torch.manual_seed(0)
    model = build_model(str(pipeline / "models/base"), {"revision": None}, PLAIN, torch.device("cpu"))
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.05)
    examples = [tokenize_conversation(tokenizer, r["messages"], 512)
                for r in read_jsonl(pipeline / "data/split/train.jsonl")[:12]]
    return model, examples, tokenizer.pad_token_id


def loss_and_grads(model, batch, p):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, p)
    loss.backward()
    return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def test_chunked_loss_equals_transformers_loss(tiny):
    model, examples, pad_id = tiny
    cpu = torch.device("cpu")
    for pack in (True, False):
        batch = make_batch(examples, speed(pack=pack), pad_id, cpu)
        reference, ref_grads = loss_and_grads(model, batch, speed(pack=pack))
        chunked, grads = loss_and_grads(model, batch, speed(pack=pack, loss_chunk_size=37))  # chunks cross rows
        assert abs(chunked - reference) < 1e-5
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), name


def test_packed_varlen_loss_equals_unpacked_loss(tiny):
    model, examples, pad_id = tiny
    cpu = torch.device("cpu")
    padded, _ = loss_and_grads(model, make_batch(examples, speed(pack=False), pad_id, cpu), speed(pack=False))
    varlen = speed(attn_implementation="varlen", loss_chunk_size=64, pack_tokens=1024)
    model = build_model(str(model.get_base_model().name_or_path), {"revision": None}, varlen, cpu)
    model.load_state_dict(tiny[0].state_dict())  # the same adapters
    batch = make_batch(examples, varlen, pad_id, cpu)
    assert batch["input_ids"].shape[0] < len(examples)  # really packed
    assert batch["cu_seq_lens_q"].numel() - 1 >= len(examples)  # one segment per conversation (+ padding)
    packed, _ = loss_and_grads(model, batch, varlen)
    assert abs(packed - padded) < 1e-5
    # the same rows as one document each: conversations attend to each other, and the loss moves
    width = batch["input_ids"].shape[1]
    leaky = dict(batch, cu_seq_lens_q=torch.arange(0, batch["input_ids"].numel() + 1, width, dtype=torch.int32))
    leaky.update(cu_seq_lens_k=leaky["cu_seq_lens_q"], max_length_q=width, max_length_k=width)
    with torch.no_grad():
        assert abs(batch_loss(model, leaky, varlen).item() - padded) > 1e-3


def test_varlen_segments_for_packed_and_padded_rows():
    examples = [{"input_ids": [5] * n, "labels": [7] * n} for n in (3, 5, 2)]
    packed = varlen_kwargs(collate(examples, True, 8, 0))  # rows: [5, 3] and [2 + 6 padding]
    assert packed["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 16]
    assert packed["max_length_q"] == 6
    padded = varlen_kwargs(collate(examples, False, 8, 0))  # 3 rows of 5: padding is its own segment
    assert padded["cu_seq_lens_q"].tolist() == [0, 3, 5, 10, 12, 15]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]


def test_packed_rows_never_train_a_document_start():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = collate(examples, True, 8, 0)
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]  # 4 is not a target of 3


def test_token_budget_steps_cover_each_conversation_once():
    examples = [{"input_ids": [0] * n} for n in (5, 9, 3, 12, 7, 1, 20)]
    steps = plan_steps(examples, speed(step_tokens=16))
    assert sorted(i for s in steps for i in s) == list(range(len(examples)))
    for s in steps:
        assert len(s) == 1 or sum(len(examples[i]["input_ids"]) for i in s) <= 16
    assert plan_steps(examples, PLAIN) == [list(range(7))]  # batch_size conversations otherwise


def test_train_stage_packs_by_default(pipeline):
    params = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    p = TrainParams.model_validate(params)
    assert TrainParams().pack and p.pack
    # defaults keep transformers' own exact path: sdpa attention, its loss, no compilation
    assert (p.attn_implementation, p.loss_chunk_size, p.compile, p.step_tokens) == ("sdpa", 0, False, None)
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/base")
    examples = [tokenize_conversation(tokenizer, r["messages"], p.max_length)
                for r in read_jsonl(pipeline / "data/split/train.jsonl")[:p.batch_size]]
    batch = make_batch(examples, p, tokenizer.pad_token_id, torch.device("cpu"))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert batch["input_ids"].shape[0] < len(examples)
