"""train.attn_implementation=varlen: FlashAttention-2's variable-length kernel, which torch builds in
(no flash-attn), registered in transformers as VARLEN. Each document of a packed batch attends causally
to itself only, found from the offsets stages/train_batches.py's varlen_kwargs adds to the batch; on a
CPU or in fp32 the same function runs as causal SDPA one document at a time.
"""
from __future__ import annotations

import functools

from stages.common import StageError

VARLEN = "tunepipe_varlen"  # the name it is registered under in transformers


@functools.cache
def flash_varlen_op():
    """Causal varlen flash attention as a torch custom op with its backward, so torch.compile keeps
    it whole: q, k, v (tokens, heads, dim), k/v may have fewer heads (GQA); cu: int32 offsets."""
    import torch

    if hasattr(torch.ops.tunepipe, "flash_varlen"):  # defined already (this module imported twice)
        return torch.ops.tunepipe.flash_varlen

    def forward_impl(q, k, v, cu, max_len, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                                scale=scale)
        return out, lse

    def backward_impl(grad, q, k, v, out, lse, cu, max_len, scale):
        # no dropout, so the random-state arguments are placeholders (as torch's own varlen_attn passes)
        rng, unused = torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device)
        return tuple(torch.ops.aten._flash_attention_backward(grad, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0,
                                                              True, rng, unused, scale=scale))

    forward = torch.library.custom_op("tunepipe::flash_varlen", forward_impl, mutates_args=(), schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor cu, SymInt max_len, float scale) -> (Tensor, Tensor)"))
    backward_op = torch.library.custom_op("tunepipe::flash_varlen_backward", backward_impl, mutates_args=(), schema=(
        "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu, SymInt max_len, float scale)"
        " -> (Tensor, Tensor, Tensor)"))
    # the aten ops have meta kernels, so tracing (torch.compile) runs the same code on fake tensors
    forward.register_fake(forward_impl)
    backward_op.register_fake(backward_impl)

    def setup_context(ctx, inputs, output):
        q, k, v, cu, max_len, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu)
        ctx.max_len, ctx.scale = max_len, scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
        return dq, dk, dv, None, None, None

    forward.register_autograd(backward, setup_context=setup_context)
    return forward


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: each document of the flattened batch attends causally to
    itself only (cu_seq_lens_q from varlen_kwargs). query/key/value: (batch, heads, seq, dim)."""
    import torch
    import torch.nn.functional as F

    if dropout:
        raise StageError("attn_implementation=varlen has no attention dropout")
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    b, heads, s, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, _ = torch.ops.tunepipe.flash_varlen(q, k, v, cu, longest, scale)  # defined by register_varlen_attention
    else:  # the same function on CPU or in fp32: causal SDPA one document at a time
        bounds, gqa = cu.tolist(), getattr(module, "num_key_value_groups", 1) > 1
        out = torch.cat([F.scaled_dot_product_attention(
            *(t[a:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), is_causal=True, scale=scale,
            enable_gqa=gqa)[0].transpose(0, 1) for a, e in zip(bounds[:-1], bounds[1:])])
    return out.view(b, s, heads, d), None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    flash_varlen_op()
    # not in transformers' mask registry, so it builds no mask for it (none is needed)
    AttentionInterface.register(VARLEN, varlen_attention)
