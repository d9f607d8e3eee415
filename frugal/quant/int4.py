"""INT4 group-wise weight-only quantization: rounding, the canonical packed layout, the reference
(dequantise) path and the `Int4LinearMethod` that multiplies with it.

Canonical layout (what checkpoints store; `K` = input features, `Kp` = K rounded up to 64):
- `qweight [N, Kp/2] uint8`: byte j of a row holds q[2j] in its low nibble and q[2j+1] in its high one;
  q in 0..15. Columns K..Kp-1 are padding that dequantises to exactly 0.
- `scales [N, ceil(Kp/G)] float16`: one per group of G input features (the last group may be short).
- `qzeros [N, ceil(Kp/G)] uint8`: the zero point z in 0..15 (asymmetric only; symmetric means z = 8).
A weight is `w = s * (q - z)`, computed exactly in float32 by `dequantize_int4`.

Rounding: symmetric is llama.cpp's Q4_0 rule (the largest-magnitude value of a group maps to -8, so
all 16 levels are used); asymmetric spans [min(w, 0), max(w, 0)] with 15 steps (as GPTQ does). The
scale is rounded to float16 first and q is computed with the rounded scale, so dequantisation
reproduces exactly the values the rounding chose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugal.layers.embedding import EmbeddingMethod
from frugal.layers.linear import NativeLinearSpec
from frugal.quant.base import QuantizedLinearMethod, TensorSpec, repack_in_row_chunks

logger = logging.getLogger(__name__)

PACK_ALIGN = 64  # input features are padded to a multiple of this (the CPU kernel's block)


def padded_in_features(in_features: int) -> int:
    return -(-in_features // PACK_ALIGN) * PACK_ALIGN


def num_groups(in_features: int, group_size: int) -> int:
    return -(-padded_in_features(in_features) // group_size)


@dataclass
class Int4Weight:
    """Canonical INT4 tensors of one weight [N, K]."""

    qweight: torch.Tensor          # [N, Kp/2] uint8
    scales: torch.Tensor           # [N, num_groups] float16
    qzeros: torch.Tensor | None    # [N, num_groups] uint8, None when symmetric
    in_features: int

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        return out


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> float32 [N, num_groups, G], zero-padded on the right."""
    n, k = weight.shape
    total = num_groups(k, group_size) * group_size
    return F.pad(weight.float(), (0, total - k)).view(n, -1, group_size)


def int4_group_params(weight: torch.Tensor, group_size: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (scales float16 [N, num_groups], zeros uint8 [N, num_groups]; 8 when symmetric)."""
    return grid_params(_grouped(weight, group_size), scheme)


def grid_params(wg: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped float32 weights [N, num_groups, width] -> (scales float16, zeros uint8), [N, num_groups].
    Zero padding inside a group changes nothing (both rules include 0 in the range)."""
    if scheme == "sym":
        index = wg.abs().argmax(-1, keepdim=True)
        extreme = wg.gather(-1, index).squeeze(-1)  # signed value of largest magnitude
        scales = (extreme / -8.0).to(torch.float16)
        zeros = torch.full(scales.shape, 8, dtype=torch.uint8)
    else:
        low = wg.amin(-1).clamp(max=0.0)
        high = wg.amax(-1).clamp(min=0.0)
        scales = ((high - low) / 15.0).to(torch.float16)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.round(-low / scales.float()).clamp(0, 15).to(torch.uint8)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # all-zero group: any scale, q = z
    return scales, zeros


def round_to_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 15) per element; weight [N, K'] with scales/zeros [N, K'] broadcast
    (already expanded to columns). Returns float32 q."""
    return torch.clamp(torch.round(weight / scales) + zeros, 0, 15)


def expand_groups(per_group: torch.Tensor, group_size: int, width: int) -> torch.Tensor:
    """[N, num_groups] -> float32 [N, width], each group's value repeated over its columns."""
    return per_group.float().repeat_interleave(group_size, dim=1)[:, :width]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [N, Kp] (values 0..15) -> [N, Kp/2] uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] uint8 -> [N, Kp] uint8 (inverse of pack_nibbles)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(1)


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, scheme: str,
              in_features: int) -> Int4Weight:
    """q [N, >=K] float/int 0..15 (columns past K ignored) -> canonical Int4Weight (padding q = z)."""
    n = q.shape[0]
    kp = padded_in_features(in_features)
    full = expand_groups(zeros, group_size, kp).to(torch.uint8).clone()  # padding dequantises to 0
    full[:, :in_features] = q[:, :in_features].to(torch.uint8)
    return Int4Weight(pack_nibbles(full.view(n, kp)), scales.contiguous(),
                      zeros.contiguous() if scheme == "asym" else None, in_features)


QUANTIZE_ROWS_PER_CHUNK = 1024  # rows rounded at once: bounds the float32 temporaries (~5 x rows x K x 4 bytes)


def quantize_int4(weight: torch.Tensor, group_size: int = 32, scheme: str = "sym") -> Int4Weight:
    """Round-to-nearest INT4 of weight [N, K] (any float dtype). Rows are independent, so a large
    tensor (an embedding) is rounded in chunks of rows: same result, a fraction of the peak memory."""
    n, k = weight.shape
    if n > QUANTIZE_ROWS_PER_CHUNK:
        parts = [quantize_int4(weight[i:i + QUANTIZE_ROWS_PER_CHUNK], group_size, scheme)
                 for i in range(0, n, QUANTIZE_ROWS_PER_CHUNK)]
        return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                          None if scheme == "sym" else torch.cat([p.qzeros for p in parts]), k)
    scales, zeros = int4_group_params(weight, group_size, scheme)
    w = weight.float()
    q = round_to_grid(w, expand_groups(scales, group_size, k), expand_groups(zeros, group_size, k))
    return pack_int4(q, scales, zeros, group_size, scheme, k)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, group_size: int,
                    in_features: int) -> torch.Tensor:
    """Canonical tensors -> float32 weight [N, in_features] (exact: s * (q - z))."""
    q = unpack_nibbles(qweight).float()  # [N, Kp]
    kp = q.shape[1]
    z = expand_groups(qzeros, group_size, kp) if qzeros is not None else 8.0
    return ((q - z) * expand_groups(scales, group_size, kp))[:, :in_features]


def to_kernel_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Canonical tensors -> the CPU kernel's layout (same shapes and dtypes): per row, every 64 weights
    become one 32-byte block (byte j = q[j] | q[j+32] << 4); rows are tiled by 4 with block b of the
    tile's rows adjacent, and a tile's scales / zeros stored [group][row] (see csrc/int4_cpu.cpp)."""
    q = unpack_nibbles(qweight)  # [N, Kp]
    n, kp = q.shape
    blocks = q.view(n, kp // 64, 2, 32)
    rows = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, kp // 2)
    n4 = n - n % 4

    def tiled(t: torch.Tensor, block: int) -> torch.Tensor:
        width = t.shape[1]
        head = t[:n4].reshape(n4 // 4, 4, width // block, block).transpose(1, 2).reshape(n4, width)
        return torch.cat((head, t[n4:])).contiguous()

    return tiled(rows, 32), tiled(scales, 1), None if qzeros is None else tiled(qzeros, 1)


def from_kernel_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of to_kernel_layout."""
    n, half = qweight.shape
    n4 = n - n % 4

    def untiled(t: torch.Tensor, block: int) -> torch.Tensor:
        width = t.shape[1]
        head = t[:n4].reshape(n4 // 4, width // block, 4, block).transpose(1, 2).reshape(n4, width)
        return torch.cat((head, t[n4:])).contiguous()

    rows = untiled(qweight, 32).view(n, half // 32, 32)
    q = torch.stack((rows & 0xF, rows >> 4), dim=2)  # [N, Kp/64, 2, 32]
    return (pack_nibbles(q.reshape(n, half * 2)), untiled(scales, 1),
            None if qzeros is None else untiled(qzeros, 1))


X16_ROWS = 16  # rows per tile of the x16 (VNNI) layout
X16_ALL_ROWS = 2**62  # max_gemv_rows for int4_x16_linear: the VNNI kernel for every batch size


def to_x16_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Canonical tensors -> the x16 layout of csrc/vnni_cpu.cpp (same shapes and dtypes; N % 16 == 0):
    rows tiled by 16; per tile, 64-byte steps of 8 weights, bytes 4i..4i+3 for row i with byte j holding
    weights 8s+j (low nibble) and 8s+4+j (high); a tile's scales / zeros stored [group][row]."""
    q = unpack_nibbles(qweight)  # [N, Kp]
    n, kp = q.shape
    steps = q.view(n // X16_ROWS, X16_ROWS, kp // 8, 2, 4)  # [tile, row, step, half, j]
    packed = (steps[:, :, :, 0, :] | (steps[:, :, :, 1, :] << 4)).transpose(1, 2).reshape(n, kp // 2)

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // X16_ROWS, X16_ROWS, t.shape[1]).transpose(1, 2).reshape(t.shape).contiguous()

    return packed.contiguous(), tiled(scales), None if qzeros is None else tiled(qzeros)


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """What the x16 (VNNI) kernels multiply instead of x [M, K]: per block of 32 features (zero-padded to
    the kernel's Kp), d = max|x| / 127 and x ~ d * round-half-even(x / d), in float32. The reference for
    the VNNI kernel's activation rounding."""
    m, k = x.shape
    blocks = F.pad(x.float(), (0, padded_in_features(k) - k)).view(m, -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).view(m, -1)[:, :k]


def from_x16_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of to_x16_layout."""
    n, half = qweight.shape
    steps = qweight.view(n // X16_ROWS, half // 4, X16_ROWS, 4).transpose(1, 2)  # [tile, row, step, j]
    q = torch.stack((steps & 0xF, steps >> 4), dim=3).reshape(n, half * 2)

    def untiled(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // X16_ROWS, t.shape[1], X16_ROWS).transpose(1, 2).reshape(t.shape).contiguous()

    return pack_nibbles(q), untiled(scales), None if qzeros is None else untiled(qzeros)


class Int4LinearMethod(QuantizedLinearMethod):
    """INT4 group-wise weights behind the LinearMethod seam.

    backend 'cpu': our AVX512 kernels, weights repacked after loading. With activations='int8' (and a
    CPU with AVX512-VNNI) a layer whose output rows are a multiple of 16 takes the x16 layout and
    `int4_x16_linear`, which rounds activations to INT8 per 32-block, for every batch size (prefill
    included: the integer dot products beat dequantising for the BLAS); otherwise the 4-row layout and
    `int4_linear`, exact in the activations' dtype. 'cuda': PyTorch's tinygemm `_weight_int4pack_mm`
    (bfloat16); 'reference': dequantise every call and `F.linear` — the oracle, and the fallback where
    no kernel is available.
    """

    def __init__(self, group_size: int, scheme: str, backend: str = "reference", max_gemv_rows: int = 16,
                 activations: str = "exact") -> None:
        assert backend in ("cpu", "cuda", "reference"), backend
        assert activations in ("exact", "int8"), activations
        self.group_size, self.scheme, self.backend, self.max_gemv_rows = group_size, scheme, backend, max_gemv_rows
        self.int8_activations = False
        if backend == "cpu":
            from frugal.quant.kernels import cpu_kernels

            self.ops = cpu_kernels()
            assert self.ops is not None, "the cpu backend needs the compiled kernels"
            self.int8_activations = activations == "int8" and self.ops.has_vnni_path()
        elif backend == "reference":
            self.int8_activations = activations == "int8"  # the oracle of the VNNI path

    def tensor_specs(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        kp, groups = padded_in_features(input_size), num_groups(input_size, self.group_size)
        specs = {"qweight": TensorSpec((output_size, kp // 2), torch.uint8),
                 "scales": TensorSpec((output_size, groups), torch.float16)}
        if self.scheme == "asym":
            specs["qzeros"] = TensorSpec((output_size, groups), torch.uint8)
        return specs

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.int4_x16 = self.int8_activations and layer.qweight.shape[0] % X16_ROWS == 0
        if self.backend == "cpu":
            repack = to_x16_layout if layer.int4_x16 else to_kernel_layout
            repack_in_row_chunks([layer.qweight, layer.scales, getattr(layer, "qzeros", None)], repack)
        elif self.backend == "cuda":
            from frugal.quant.cuda import pack_for_tinygemm

            layer.tinygemm = pack_for_tinygemm(layer.qweight, layer.scales, getattr(layer, "qzeros", None),
                                               self.group_size, layer.input_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "cpu":
            ops = torch.ops.frugal if torch.compiler.is_compiling() else self.ops  # dispatcher op: traceable
            if getattr(layer, "int4_x16", False):
                return ops.int4_x16_linear(x, layer.qweight, layer.scales, getattr(layer, "qzeros", None),
                                           self.group_size, bias, X16_ALL_ROWS)
            return ops.int4_linear(x, layer.qweight, layer.scales, getattr(layer, "qzeros", None),
                                        self.group_size, bias, self.max_gemv_rows)
        if self.backend == "cuda":
            from frugal.quant.cuda import tinygemm_linear

            return tinygemm_linear(x, layer.tinygemm, self.group_size, layer.input_size, bias)
        weight = dequantize_int4(layer.qweight, layer.scales, getattr(layer, "qzeros", None), self.group_size,
                                 layer.input_size)
        if getattr(layer, "int4_x16", False):  # what the VNNI kernel computes, in float32
            return F.linear(round_activations_int8(x), weight, None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def native_spec(self, layer: nn.Module) -> NativeLinearSpec | None:
        if self.backend != "cpu":
            return None
        x16 = getattr(layer, "int4_x16", False)
        return NativeLinearSpec("int4_x16" if x16 else "int4", layer.qweight, layer.scales,
                                getattr(layer, "qzeros", None), self.group_size,
                                X16_ALL_ROWS if x16 else self.max_gemv_rows)

    def canonical(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        qweight, scales, qzeros = layer.qweight, layer.scales, getattr(layer, "qzeros", None)
        if self.backend == "cpu":
            unpack = from_x16_layout if getattr(layer, "int4_x16", False) else from_kernel_layout
            qweight, scales, qzeros = unpack(qweight, scales, qzeros)
        tensors = {"qweight": qweight, "scales": scales}
        if qzeros is not None:
            tensors["qzeros"] = qzeros
        return tensors


class Int4EmbeddingMethod(EmbeddingMethod):
    """Embedding rows stored INT4 in the checkpoint layout (`qweight [vocab, Kp/2]`, `scales`, `qzeros`
    for asym, groups along the hidden dimension); a lookup dequantises only the rows it reads and returns
    them in `dtype`. Never repacked, so it cannot share its tensors with an INT4 LM head (not tied)."""

    def __init__(self, group_size: int, scheme: str, dtype: torch.dtype) -> None:
        self.group_size, self.scheme, self.dtype = group_size, scheme, dtype

    def create_weights(self, layer: nn.Module, vocab_size: int, hidden_size: int, params_dtype: torch.dtype) -> None:
        layer.hidden_size = hidden_size
        specs = Int4LinearMethod(self.group_size, self.scheme).tensor_specs(hidden_size, vocab_size)
        for name, spec in specs.items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.weight_loader = layer.weight_loader
            param.keep_dtype = True
            layer.register_parameter(name, param)

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        qzeros = getattr(layer, "qzeros", None)
        rows = dequantize_int4(layer.qweight[input_ids], layer.scales[input_ids],
                               None if qzeros is None else qzeros[input_ids], self.group_size, layer.hidden_size)
        return rows.to(self.dtype)  # [num_tokens, hidden]
