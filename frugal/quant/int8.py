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
from frugal.quant.base import QuantizedLinearMethod, TensorSpec


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


def _int8_specs(rows: int, cols: int) -> dict[str, TensorSpec]:
    return {"qweight": TensorSpec((rows, cols), torch.int8), "scales": TensorSpec((rows,), torch.float32)}


class Int8LinearMethod(QuantizedLinearMethod):
    """backend 'cpu': our AVX512 kernel; 'cuda' / 'reference': dequantise and `F.linear`."""

    def __init__(self, backend: str = "reference", max_gemv_rows: int = 16) -> None:
        assert backend in ("cpu", "cuda", "reference"), backend
        self.backend, self.max_gemv_rows = backend, max_gemv_rows
        if backend == "cpu":
            from frugal.quant.kernels import cpu_kernels

            self.ops = cpu_kernels()
            assert self.ops is not None, "the cpu backend needs the compiled kernels"

    def tensor_specs(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        return _int8_specs(output_size, input_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "cpu":
            ops = torch.ops.frugal if torch.compiler.is_compiling() else self.ops  # dispatcher op: traceable
            return ops.int8_linear(x, layer.qweight, layer.scales, bias, self.max_gemv_rows)
        return F.linear(x, dequantize_int8(layer.qweight, layer.scales).to(x.dtype), bias)

    def canonical(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"qweight": layer.qweight, "scales": layer.scales}


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
        rows = F.embedding(input_ids, layer.qweight).float()  # [num_tokens, hidden]
        return (rows * layer.scales[input_ids].unsqueeze(1)).to(self.dtype)
