"""Gated activations. Each takes the fused gate_up projection output `[..., 2 * d]` (gate first, then
up) and returns `act(gate) * up` `[..., d]`:

- `silu`: SwiGLU (Llama); frugal's fused CPU op when the kernels are loaded, else eager;
- `relu`: ReGLU (ReluLLaMA; Shazeer, "GLU Variants Improve Transformer", 2020), eager;
- `gelu` (exact, erf) / `gelu_pytorch_tanh` (tanh approximation): GeGLU, eager, matching transformers'
  `ACT2FN` entries of the same names.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from frugal.layers.fused import fused_op


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        fused = fused_op("silu_and_mul")  # one op (frugal's CPU kernels) or three (eager)
        self.forward = fused if fused is not None else self._forward_native

    @staticmethod
    def _forward_native(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GatedAct(nn.Module):
    """`act(gate) * up` with an eager elementwise `act`."""

    def __init__(self, name: str, act) -> None:
        super().__init__()
        self.name, self.act = name, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]  # [..., d]

    def extra_repr(self) -> str:
        return self.name


_EAGER_ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}
GATED_ACTIVATIONS = ("silu", *_EAGER_ACTS)


def get_act_and_mul(name: str) -> nn.Module:
    """Gated activation by the config's `hidden_act` name (validated by ArchConfig)."""
    if name == "silu":
        return SiluAndMul()
    if name in _EAGER_ACTS:
        return GatedAct(name, _EAGER_ACTS[name])
    raise ValueError(f"unsupported gated activation {name!r}; supported: {', '.join(GATED_ACTIVATIONS)}")
