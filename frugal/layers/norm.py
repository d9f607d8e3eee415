"""RMSNorm (Zhang & Sennrich, 2019) with an optional fused residual add, as in vLLM.

The statistic is computed in float32 whatever the activation dtype; the result is cast back to the
input dtype before the weight multiply, exactly as transformers' LlamaRMSNorm does, so fp32 results
match it bit for bit and bf16 results round the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from frugal.layers.fused import fused_op


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)  # [hidden]
        # One fused op per call when frugal's CPU kernels are loaded (chosen once, here).
        self._rms_norm, self._fused_add_rms_norm = fused_op("rms_norm"), fused_op("fused_add_rms_norm")
        fused = self._rms_norm is not None and self._fused_add_rms_norm is not None
        self._forward_method = self._forward_fused if fused else self._forward_native

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`forward(x)` -> norm(x); `forward(x, residual)` -> (norm(x + residual), x + residual).
        The sum is taken in the activation dtype (as transformers does between layers)."""
        return self._forward_method(x, residual)

    def _forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)

    def _forward_native(self, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
