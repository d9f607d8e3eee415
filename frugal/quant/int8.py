"""INT8 weight-only quantization, one symmetric scale per output channel (per row of a linear weight,
per token of an embedding): `w = s * q`, q in -127..127, s = max|w| / 127 in float32.

Canonical tensors: `qweight [N, K] int8`, `scales [N] float32`. `Int8LinearMethod` multiplies with
our CPU kernel (backend 'cpu'), or dequantises (`F.linear` on `q.to(dtype) * s`) — the oracle, and
the CUDA path. `Int8EmbeddingMethod` looks rows up and scales them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugal.layers.embedding import EmbeddingMethod
from frugal.layers.linear import NativeLinearSpec
from frugal.quant.base import QuantizedLinearMethod, TensorSpec, repack_in_row_chunks


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor   # [N] float32

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}


QUANTIZE_ROWS_PER_CHUNK = 4096  # rows rounded at once: bounds the float32 temporaries


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Round-to-nearest per-row INT8 of weight [N, K]; large tensors in chunks of rows (same result)."""
    if weight.shape[0] > QUANTIZE_ROWS_PER_CHUNK:
        parts = [quantize_int8(weight[i:i + QUANTIZE_ROWS_PER_CHUNK])
                 for i in range(0, weight.shape[0], QUANTIZE_ROWS_PER_CHUNK)]
        return Int8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127.0  # [N]
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales.contiguous())


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-> float32 [N, K] (exact: s * q)."""
    return qweight.float() * scales.float()[:, None]


X16_ROWS = 16  # rows per tile of the x16 (VNNI) layout
X16_ALL_ROWS = 2**62  # max_gemv_rows for int8_x16_linear: the VNNI kernel for every batch size


def to_x16_layout(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> the x16 layout of csrc/vnni_cpu.cpp (N % 16 == 0, K % 4 == 0): rows tiled by 16,
    per tile 64-byte steps of 4 weights per row."""
    n, k = qweight.shape
    return qweight.view(n // X16_ROWS, X16_ROWS, k // 4, 4).transpose(1, 2).reshape(n, k).contiguous()


def from_x16_layout(qweight: torch.Tensor) -> torch.Tensor:
    n, k = qweight.shape
    return qweight.view(n // X16_ROWS, k // 4, X16_ROWS, 4).transpose(1, 2).reshape(n, k).contiguous()


def _int8_specs(rows: int, cols: int) -> dict[str, TensorSpec]:
    return {"qweight": TensorSpec((rows, cols), torch.int8), "scales": TensorSpec((rows,), torch.float32)}


class Int8LinearMethod(QuantizedLinearMethod):
    """backend 'cpu': our AVX512 kernels. With activations='int8' (and AVX512-VNNI) a layer with
    N % 16 == 0 and K % 32 == 0 takes the x16 layout and `int8_x16_linear` (activations rounded to INT8
    per 32-block, every batch size); otherwise `int8_linear`, exact in the activations' dtype.
    'cuda' / 'reference': dequantise and `F.linear` ('reference' rounds activations like the x16 kernel
    where that kernel would run: its oracle)."""

    def __init__(self, backend: str = "reference", max_gemv_rows: int = 16, activations: str = "exact") -> None:
        assert backend in ("cpu", "cuda", "reference"), backend
        assert activations in ("exact", "int8"), activations
        self.backend, self.max_gemv_rows = backend, max_gemv_rows
        self.int8_activations = activations == "int8" and backend == "reference"
        if backend == "cpu":
            from frugal.quant.kernels import cpu_kernels

            self.ops = cpu_kernels()
            assert self.ops is not None, "the cpu backend needs the compiled kernels"
            self.int8_activations = activations == "int8" and self.ops.has_vnni_path()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        n, k = layer.qweight.shape
        layer.int8_x16 = self.int8_activations and n % X16_ROWS == 0 and k % 32 == 0
        if self.backend == "cpu" and layer.int8_x16:
            repack_in_row_chunks([layer.qweight], lambda chunk: [to_x16_layout(chunk)])
            # A head tied to the embedding shares this tensor: the flag on the tensor tells the lookup.
            layer.qweight.x16_layout = True

    def tensor_specs(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        return _int8_specs(output_size, input_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "cpu":
            ops = torch.ops.frugal if torch.compiler.is_compiling() else self.ops  # dispatcher op: traceable
            if getattr(layer, "int8_x16", False):
                return ops.int8_x16_linear(x, layer.qweight, layer.scales, bias, X16_ALL_ROWS)
            return ops.int8_linear(x, layer.qweight, layer.scales, bias, self.max_gemv_rows)
        weight = dequantize_int8(layer.qweight, layer.scales)
        if getattr(layer, "int8_x16", False):  # what the VNNI kernel computes, in float32
            from frugal.quant.int4 import round_activations_int8

            return F.linear(round_activations_int8(x), weight, None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def native_spec(self, layer: nn.Module) -> NativeLinearSpec | None:
        if self.backend != "cpu":
            return None
        x16 = getattr(layer, "int8_x16", False)
        return NativeLinearSpec("int8_x16" if x16 else "int8", layer.qweight, layer.scales,
                                max_rows=X16_ALL_ROWS if x16 else self.max_gemv_rows)

    def canonical(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        qweight = layer.qweight
        if self.backend == "cpu" and getattr(layer, "int8_x16", False):
            qweight = from_x16_layout(qweight)
        return {"qweight": qweight, "scales": layer.scales}


class Int8EmbeddingMethod(EmbeddingMethod):
    """Embedding rows stored INT8 with one scale per token; a lookup dequantises only the rows it reads
    and returns them in `dtype` (the model's)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def create_weights(self, layer: nn.Module, vocab_size: int, hidden_size: int, params_dtype: torch.dtype) -> None:
        for name, spec in _int8_specs(vocab_size, hidden_size).items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.weight_loader = layer.weight_loader
            param.keep_dtype = True
            layer.register_parameter(name, param)

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        qweight = layer.qweight
        if getattr(qweight, "x16_layout", False):  # repacked by a tied INT8 LM head: row r is lane r % 16
            vocab, hidden = qweight.shape
            tiles = qweight.view(vocab // X16_ROWS, hidden // 4, X16_ROWS, 4)
            rows = tiles[input_ids // X16_ROWS, :, input_ids % X16_ROWS, :].reshape(-1, hidden).float()
        else:
            rows = F.embedding(input_ids, qweight).float()  # [num_tokens, hidden]
        return (rows * layer.scales[input_ids].unsqueeze(1)).to(self.dtype)
