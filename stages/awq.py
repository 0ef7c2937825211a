"""The AWQ "gemm" int4 layout that lmdeploy's quantizer writes and TurboMind loads, read back in
plain torch. Shared by turbomind (to measure the quantisation error) and eval (to score the
quantised weights on a CPU, where TurboMind cannot run); both environments have torch."""
from __future__ import annotations

# AWQ gemm packs 8 int4 values per int32, value order[i] in nibble i (TurboMind's loader,
# lmdeploy/turbomind/weight_format.py, reads them back in the inverse order).
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_int4(packed, order=AWQ_PACK_ORDER):
    """int32 [rows, cols] -> int [rows, cols*8]; nibble i of column c holds column c*8+order[i]."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF     # [rows, cols, 8]
    out = torch.empty_like(nibbles)
    out[:, :, order] = nibbles
    return out.reshape(packed.shape[0], -1)


def dequantize_linear(qweight, qzeros, scales, group_size: int):
    """qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out] -> float32 nn.Linear weight
    [out, in] = (q - zero) * scale, as lmdeploy's pseudo_quantize_tensor made it."""
    import torch

    q = unpack_int4(qweight).to(torch.float32)                                   # [in, out]
    z = unpack_int4(qzeros).to(torch.float32).repeat_interleave(group_size, 0)   # [in, out]
    s = scales.to(torch.float32).repeat_interleave(group_size, 0)                # [in, out]
    return ((q - z) * s).t().contiguous()
