"""The memory-bandwidth roofline of batch-1 decoding: tokens/s <= bandwidth / bytes read per token.

`measure_bandwidth` reads a buffer much larger than the last-level cache once per repeat with the
given thread count (frugal's vectorised read probe when the kernels are built, else `torch.sum`) and
reports the best GB/s. `decode_bytes_per_token` counts what one decoded token reads: every weight of
every projection (of a mixture of experts, the routed top_k experts' share) and the LM head (packed
bytes, scales and zero points for quantized ones), the norms, one embedding row, and the KV cache up
to the mean context length of the measured run.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def measure_bandwidth(threads: int, size_mib: int = 1024, repeats: int = 5) -> dict:
    """-> {'bandwidth_gb_s': best read GB/s, 'method': ..., 'threads': ...} (1 GB = 1e9 bytes)."""
    from frugal.quant.kernels import cpu_kernels

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops = cpu_kernels()
        num_bytes = size_mib * 2**20
        if ops is not None:
            storage = torch.empty(num_bytes + 64, dtype=torch.uint8)
            offset = (-storage.data_ptr()) % 64
            buffer = storage[offset:offset + num_bytes]
            buffer.fill_(1)
            probe, method = (lambda: ops.read_probe(buffer)), "frugal read_probe (AVX-512 loads)"
        else:
            buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
            probe, method = (lambda: buffer.sum()), "torch.sum (float32)"
        probe()  # fault the pages in
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            probe()
            best = max(best, num_bytes / (time.perf_counter() - start) / 1e9)
        return {"bandwidth_gb_s": best, "method": method, "threads": threads, "buffer_mib": size_mib}
    finally:
        torch.set_num_threads(previous)


def decode_bytes_per_token(model: nn.Module, kv_bytes_per_token_position: int, mean_context: float) -> dict:
    """Bytes one decode step reads from a loaded frugal model (see module docstring)."""
    seen: set[int] = set()
    weight_bytes = 0
    embedding_bytes = 0
    vocab_size = 1
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and getattr(module, "top_k", None):
            # Mixture of experts: a token reads top_k of the experts (the mean over experts' sizes).
            expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters() if id(p) not in seen)
            weight_bytes += expert_bytes * module.top_k // len(experts)
            seen.update(id(p) for p in experts.parameters())
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if type(module).__name__ == "VocabEmbedding":
            vocab_size = module.vocab_size
            embedding_bytes = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            # A tied LM head reads the whole table every step: count it there, not here.
            continue
        for param in params:
            seen.add(id(param))
            weight_bytes += param.numel() * param.element_size()
    embedding_row = embedding_bytes // max(vocab_size, 1)
    kv_bytes = int(kv_bytes_per_token_position * mean_context)
    return {"weight_bytes": weight_bytes, "embedding_row_bytes": embedding_row, "kv_cache_bytes": kv_bytes,
            "total_bytes": weight_bytes + embedding_row + kv_bytes}


def roofline_fraction(tokens_per_s: float, bytes_per_token: int, bandwidth_gb_s: float) -> float:
    return tokens_per_s * bytes_per_token / (bandwidth_gb_s * 1e9)
