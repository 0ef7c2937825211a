"""The hf backend's chunked causal-LM loss (train.loss_chunk_size): cross-entropy from the final
hidden states a chunk of tokens at a time, so the (tokens x vocab) fp32 logits never exist whole.
The gradient is made in the forward pass; tests/test_train_speed_paths.py checks it equals
transformers' own loss."""
from __future__ import annotations

import functools

from stages.chat_template import IGNORE


def ce_chunk(logits, targets, weight):
    """Cross-entropy sum of one chunk and its gradient w.r.t. the logits (softmax in fp32, as
    transformers' loss does); weight: each token's share of the mean (0 for unlabelled ones)."""
    import torch

    x = logits.float()
    lse = x.logsumexp(-1)
    safe = targets.clamp(min=0)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - picked) * (weight > 0)).sum()
    grad = (x - lse[:, None]).exp()
    grad = grad - (torch.arange(x.shape[1], device=x.device) == safe[:, None]).to(grad.dtype)
    return loss, (grad * weight[:, None]).to(logits.dtype)


@functools.cache
def chunked_ce_function(compiled: bool):
    """autograd Function: mean CE of hidden @ weight.T over labelled targets, chunk by chunk. The
    gradient is made in the forward pass, so only hidden-sized tensors are kept for backward."""
    import torch

    chunk_fn = torch.compile(ce_chunk, dynamic=True) if compiled else ce_chunk

    class ChunkedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk_size: int):
            labelled = targets != IGNORE
            share = labelled / labelled.sum().clamp(min=1)  # tokens' weights in the mean, no host sync
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = hidden.new_zeros((), dtype=torch.float32)
            for a in range(0, hidden.shape[0], chunk_size):
                h = hidden[a:a + chunk_size]
                loss, grad = chunk_fn(h @ weight.t(), targets[a:a + chunk_size], share[a:a + chunk_size])
                total += loss
                if grad_hidden is not None:
                    grad_hidden[a:a + chunk_size] = grad @ weight
                if grad_weight is not None:
                    grad_weight += (grad.t() @ h).float()
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total / labelled.sum().clamp(min=1)

        @staticmethod
        def backward(ctx, grad_out):
            grad_hidden, grad_weight = ctx.saved_tensors
            return (grad_hidden * grad_out if grad_hidden is not None else None,
                    (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None, None, None)

    return ChunkedCE


def chunked_causal_lm_loss(hidden, weight, labels, position_ids, chunk_size: int, compiled: bool = False):
    """transformers' causal-LM loss (mean next-token CE over labelled tokens) from the final hidden
    states and the output-embedding weight, chunk_size tokens at a time."""
    import torch

    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:  # a packed document's last token does not predict the next document
        targets[:, :-1].masked_fill_(position_ids[:, 1:] == 0, IGNORE)
    function = chunked_ce_function(compiled)
    return function.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.flatten(), chunk_size)
