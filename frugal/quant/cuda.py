"""INT4 on CUDA through PyTorch's tinygemm kernel (`aten._weight_int4pack_mm`, bfloat16).

tinygemm dequantises w = (q - 8) * scale + zero with q in 0..15, a float zero per group; our format
w = s * (q - z) maps onto it exactly in real arithmetic: scale = s, zero = s * (8 - z) (symmetric:
z = 8, zero = 0). Both are stored in bfloat16 (tinygemm's requirement), so results differ from the
float32 oracle by bfloat16 rounding of the scales. tinygemm needs K to be a multiple of the group size
and of 16 * inner_k_tiles; `pack_for_tinygemm` pads K with zero groups when it is not.
Untested here (no GPU on the development machine); `tests/quant/test_cuda.py` checks it against the
oracle where a GPU exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frugal.quant.int4 import unpack_nibbles

INNER_K_TILES = 8


def pack_for_tinygemm(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, group_size: int,
                      in_features: int) -> dict:
    """Canonical INT4 tensors (on CUDA) -> {'packed', 'scales_and_zeros', 'k'} for `tinygemm_linear`."""
    q = unpack_nibbles(qweight).to(torch.int32)  # [N, Kp]
    n, kp = q.shape
    align = max(group_size, 16 * INNER_K_TILES)
    k = -(-kp // align) * align
    num_groups = k // group_size
    s = scales.float()
    z = qzeros.float() if qzeros is not None else torch.full_like(s, 8.0)
    if s.shape[1] < num_groups:  # zero groups past the padding: q = 8, scale 1, zero 0 -> weight 0
        pad = num_groups - s.shape[1]
        s = F.pad(s, (0, pad), value=1.0)
        z = F.pad(z, (0, pad), value=8.0)
    q = F.pad(q, (0, k - kp), value=8)
    # torch >= 2.5 takes uint8 [N, K/2] with the even column in the high nibble (as gpt-fast / torchao pack).
    q_uint8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(q_uint8, INNER_K_TILES)
    scales_and_zeros = torch.stack((s, s * (8.0 - z)), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {"packed": packed, "scales_and_zeros": scales_and_zeros, "k": k}


def tinygemm_linear(x: torch.Tensor, state: dict, group_size: int, in_features: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in_features] -> [M, N] in x.dtype."""
    xb = x.to(torch.bfloat16)
    if state["k"] != in_features:
        xb = F.pad(xb, (0, state["k"] - in_features))
    out = torch.ops.aten._weight_int4pack_mm(xb, state["packed"], group_size, state["scales_and_zeros"])
    out = out.to(x.dtype)
    return out + bias if bias is not None else out
