"""Attention backends behind one interface (`AttentionBackend`); chosen by name at construction."""

from __future__ import annotations

import torch

from frugal.layers.fused import fused_op

from frugal.layers.attention_backends.base import AttentionBackend
from frugal.layers.attention_backends.cpu_paged import CpuPagedAttentionBackend
from frugal.layers.attention_backends.reference import ReferenceAttentionBackend
from frugal.layers.attention_backends.sdpa import SdpaAttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceAttentionBackend,
    "sdpa": SdpaAttentionBackend,
    "cpu": CpuPagedAttentionBackend,
}


def get_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """'auto' | 'reference' | 'sdpa' | 'cpu' -> a backend instance. 'auto' = 'cpu' (frugal's fused decode
    kernel) on a CPU once the kernels are loaded, else 'sdpa'."""
    if name == "auto":
        name = "cpu" if torch.device(device).type == "cpu" and fused_op("paged_attention_decode") else "sdpa"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


__all__ = ["AttentionBackend", "CpuPagedAttentionBackend", "ReferenceAttentionBackend", "SdpaAttentionBackend",
           "get_attention_backend"]
