"""The train stage's optimizer step: batch_loss (mean cross-entropy over a batch's labelled tokens,
a chunk at a time with train.loss_chunk_size), train_step (one optimizer step), make_optimizer (AdamW
over the LoRA weights), resolve_step_tokens (step_tokens auto: the budget this GPU fits, measured with
real steps, stages/fit_memory.py) and evaluate_loss (the mean loss over a split).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from stages import distributed
from stages.chunked_loss import chunked_causal_lm_loss
from stages.common import StageError
from stages.train_batches import make_batch, plan_steps

if TYPE_CHECKING:
    from stages.train import TrainParams


def batch_loss(model, batch, p: TrainParams | None = None) -> "torch.Tensor":
    """Mean cross-entropy over every labelled token of the step (same for packed and padded)."""
    import torch

    from stages.train import TrainParams  # here, not at the top: stages.train imports this module

    p = p or TrainParams()
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.dtype == "bfloat16"):
        if not p.loss_chunk_size:
            return model(**batch, use_cache=False).loss
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None or getattr(lm.config, "final_logit_softcapping",
                                                                                  None):
            raise StageError("train.loss_chunk_size needs a plain, bias-free, untrained lm_head")
        return chunked_causal_lm_loss(hidden, head.weight, batch["labels"], batch.get("position_ids"),
                                      p.loss_chunk_size, compiled=p.compile)


def train_step(model, batch: dict, optimizer, p: TrainParams) -> "torch.Tensor":
    """One optimizer step on one batch; returns the loss (still on the device: no sync here)."""
    loss = batch_loss(model, batch, p)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def make_optimizer(model, p: TrainParams, device):
    import torch

    return torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p.lr,
                             weight_decay=p.weight_decay, fused=True if device.type == "cuda" else None)


def resolve_step_tokens(model, examples: list[dict], p: TrainParams, pad_id: int, device) -> tuple[TrainParams, dict]:
    """p with step_tokens auto replaced by the budget this device fits (stages/fit_memory.py), and
    what to report about it. Runs real train steps on a CUDA device, leaving the model as it was."""
    if p.step_tokens != "auto":
        return p, {"step_tokens": p.step_tokens}
    if device.type != "cuda":
        print(f"train: step_tokens auto measures GPU memory; on {device.type} steps are train.batch_size="
              f"{p.batch_size} conversations (as step_tokens null)")
        return p.model_copy(update={"step_tokens": None}), {"step_tokens": None, "step_tokens_auto": "no GPU: batch_size"}
    import torch

    from stages.fit_memory import auto_step_tokens, cuda_limit, measure_cuda, preserved

    optimizer = make_optimizer(model, p, device)  # a throwaway: the probes' optimizer state is not kept
    step = lambda conversations: train_step(model, make_batch(conversations, p, pad_id, device), optimizer, p)  # noqa: E731
    plan = lambda budget: plan_steps(examples, p.model_copy(update={"step_tokens": budget}),  # noqa: E731
                                     random.Random(p.seed))  # the first epoch's steps, as training plans them
    model.train()
    row = (p.pack_tokens or p.max_length) if p.pack else p.max_length
    limit, fraction = cuda_limit(device)
    with preserved(model):  # the probe steps' updates and random numbers are undone
        budget, report = auto_step_tokens(lambda conversations: measure_cuda(step, conversations, model, device),
                                          examples, plan, p.pack, row, p.max_length, p.step_tokens_memory, limit)
    report["memory_fraction"] = fraction
    del optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # peak_memory_mb is training's own
    print(f"train: step_tokens auto = {budget} (rows of {row} tokens; predicted peak {report['predicted_peak_mb']:.0f} "
          f"MiB, measured {report['verified_peak_mb']:.0f} MiB of {report['limit_mb']:.0f} MiB this process may use)")
    return p.model_copy(update={"step_tokens": budget}), {"step_tokens": budget, "step_tokens_auto": report}


def evaluate_loss(model, examples, p: TrainParams, pad_id: int, device, loss_of=None) -> float:
    """Mean loss over every labelled token of examples; loss_of(batch) is the sharded model's
    loss where several processes train (each runs every batch: the collectives need all)."""
    import torch

    loss_of = loss_of or (lambda batch: batch_loss(model, batch, p))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for step in plan_steps(examples, p):
            chunk = [examples[i] for i in step]
            n = sum(distributed.labelled(e) for e in chunk)
            total += loss_of(make_batch(chunk, p, pad_id, device)).item() * n
            count += n
    model.train()
    return total / count
