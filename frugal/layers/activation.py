"""Gated activations. `SiluAndMul` takes the fused gate_up projection output `[..., 2 * d]` (gate first,
then up) and returns `silu(gate) * up` `[..., d]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


def get_act_and_mul(name: str) -> nn.Module:
    """Gated activation by the config's `hidden_act` name (validated by ArchConfig)."""
    if name == "silu":
        return SiluAndMul()
    raise ValueError(f"unsupported gated activation {name!r}; supported: silu")
