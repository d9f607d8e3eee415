"""16-bit weights on the CPU through our streaming BF16 kernel.

oneDNN/MKL's bf16 GEMM is built for large batches; for a handful of rows (batch-1 decoding) it
reads the weight at a fraction of the memory bandwidth. `CpuDenseLinearMethod` keeps the dense
`weight [N, K]` layout of `UnquantizedLinearMethod` (same parameters, same loading) and only changes
the multiply: up to `max_gemv_rows` rows go through the kernel (vdpbf16ps, fp32 accumulation), more
rows through `F.linear`. Used only for bfloat16 models on CPUs where the kernels are built.
"""

from __future__ import annotations

import torch
from torch import nn

from frugal.layers.linear import NativeLinearSpec, UnquantizedLinearMethod


class CpuDenseLinearMethod(UnquantizedLinearMethod):
    def __init__(self, max_gemv_rows: int = 16) -> None:
        from frugal.quant.kernels import cpu_kernels

        self.ops = cpu_kernels()
        assert self.ops is not None, "CpuDenseLinearMethod needs the compiled kernels"
        self.max_gemv_rows = max_gemv_rows

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = torch.ops.frugal if torch.compiler.is_compiling() else self.ops  # dispatcher op: traceable
        return ops.bf16_linear(x, layer.weight, bias, self.max_gemv_rows)

    def native_spec(self, layer: nn.Module) -> NativeLinearSpec | None:
        return NativeLinearSpec("bf16", layer.weight, max_rows=self.max_gemv_rows)
