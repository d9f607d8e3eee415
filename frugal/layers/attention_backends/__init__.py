"""Attention backends behind one interface (`AttentionBackend`); chosen by name at construction."""

from __future__ import annotations

import torch

from frugal.layers.attention_backends.base import AttentionBackend
from frugal.layers.attention_backends.reference import ReferenceAttentionBackend
from frugal.layers.attention_backends.sdpa import SdpaAttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceAttentionBackend,
    "sdpa": SdpaAttentionBackend,
}


def get_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """'auto' | 'reference' | 'sdpa' -> a backend instance ('auto' = sdpa on every device for now)."""
    del device  # every backend here runs on CPU and CUDA alike
    if name == "auto":
        name = "sdpa"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


__all__ = ["AttentionBackend", "ReferenceAttentionBackend", "SdpaAttentionBackend", "get_attention_backend"]
