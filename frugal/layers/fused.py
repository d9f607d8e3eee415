"""frugal's fused CPU ops (`torch.ops.frugal.*`), looked up by the layers at construction.

The ops exist once `frugal.quant.kernels.cpu_kernels()` has loaded the extension (`load_model` does so
on CPU). A layer built before that, or with `FRUGAL_NO_KERNELS=1`, keeps its eager PyTorch forward;
both give the same result up to the order of fp32 reductions (tests compare them).
"""

from __future__ import annotations

import torch


def fused_op(name: str):
    """torch.ops.frugal.<name>, or None when the extension is not loaded."""
    try:
        return getattr(torch.ops.frugal, name)
    except (AttributeError, RuntimeError):
        return None
