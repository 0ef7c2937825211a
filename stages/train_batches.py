"""How the train stage's examples become steps and batches: plan_steps (one epoch's steps, batch_size
conversations or a step_tokens budget), collate (packed rows, positions restarting per conversation, or
padded rows), varlen_kwargs (each document's offsets, for the varlen attention) and make_batch (a step's
conversations as model inputs on the device, laid out as train params ask).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from stages.chat_template import IGNORE

if TYPE_CHECKING:
    from stages.train import TrainParams


def plan_steps(examples: list[dict], p: TrainParams, rng: random.Random | None = None) -> list[list[int]]:
    """One epoch's steps, as indices into examples (shuffled by rng): batch_size conversations a
    step, or with step_tokens as many as fit that token budget (at least one)."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    if not p.step_tokens:
        return [order[i:i + p.batch_size] for i in range(0, len(order), p.batch_size)]
    steps, current, used = [], [], 0
    for i in order:
        n = len(examples[i]["input_ids"])
        if current and used + n > p.step_tokens:
            steps.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return steps + [current] if current else steps


def collate(examples: list[dict], pack: bool, row_length: int, pad_id: int):
    """One step's batch. Packed: rows of concatenated samples, position_ids restarting at each
    sample and no attention mask (the attention masks per document, derived from the positions).
    Unpacked: padded to the longest sample, with an attention mask."""
    import torch

    if not pack:
        width = max(len(e["input_ids"]) for e in examples)
        pad = lambda seq, value: seq + [value] * (width - len(seq))
        return {"input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
                "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
                "labels": torch.tensor([pad(e["labels"], IGNORE) for e in examples])}
    rows: list[list[dict]] = [[]]
    used: list[int] = [0]  # tokens in each row
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):  # first-fit decreasing
        for r, row in enumerate(rows):
            if used[r] + len(e["input_ids"]) <= row_length:
                row.append(e)
                used[r] += len(e["input_ids"])
                break
        else:
            rows.append([e])
            used.append(len(e["input_ids"]))
    width = max(used)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids = [t for x in row for t in x["input_ids"]]
        # a sample's first token is never a target: the previous sample's last token must not learn it
        r_labels = [t for x in row for t in [IGNORE, *x["labels"][1:]]]
        r_pos = [i for x in row for i in range(len(x["input_ids"]))]
        fill = width - len(r_ids)
        # padding continues as one more "document" so it never attends into real samples
        ids.append(r_ids + [pad_id] * fill)
        labels.append(r_labels + [IGNORE] * fill)
        positions.append(r_pos + list(range(fill)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def varlen_kwargs(batch: dict) -> dict:
    """Document boundaries of a batch for the varlen attention, in transformers' flash-attention
    kwargs: offsets of every document in the flattened (rows x width) tokens, where positions restart."""
    import torch

    positions = batch.get("position_ids")
    if positions is None:  # padded rows: the padding after each sample is a document of its own
        mask = batch["attention_mask"]
        columns = torch.arange(mask.shape[1]).expand_as(mask)
        positions = torch.where(mask.bool(), columns, columns - mask.sum(1, keepdim=True))
        batch = dict(batch, position_ids=positions)
    flat = positions.flatten()
    cu = torch.cat([(flat == 0).nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return dict(batch, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def make_batch(examples: list[dict], p: TrainParams, pad_id: int, device) -> dict:
    """A step's conversations as model inputs on device, laid out as p asks."""
    import torch

    batch = collate(examples, p.pack, p.pack_tokens or p.max_length, pad_id)
    if p.attn_implementation == "varlen":
        batch = varlen_kwargs(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
