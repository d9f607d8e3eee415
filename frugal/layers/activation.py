"""Gated activations. `SiluAndMul` takes the fused gate_up projection output `[..., 2 * d]` (gate first,
then up) and returns `silu(gate) * up` `[..., d]`."""

from __future__ import annotations

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


def get_act_and_mul(name: str) -> nn.Module:
    """Gated activation by the config's `hidden_act` name (validated by ArchConfig)."""
    if name == "silu":
        return SiluAndMul()
    raise ValueError(f"unsupported gated activation {name!r}; supported: silu")
