"""`torch.compile` of the CPU decode step (`LLM(..., compile=True)`, `--compile`).

A batch-1 decode step of a small model is mostly Python: ~30 layers x ~12 module calls, attribute
look-ups, views and splits around ~11 kernel calls per layer. Compiling the model body for *decode-only*
steps with Inductor's C++ wrapper (`cpp_wrapper`) replaces all of that by one C++ function that calls
the same kernels through the dispatcher. Measured on a SmolLM2-135M-shaped INT4 model (bf16, batch 1,
one thread, engine steps interleaved with an eager engine): 20.7 -> 15.2 ms per step; TinyLlama-1.1B
shape: 64 -> 54 ms. Compiling takes ~1-2 min per graph cold (Inductor's caches make later runs fast).

What makes the step traceable without graph breaks or per-step recompiles:
- every kernel is a dispatcher op (`torch.ops.frugal.*`, csrc/dispatcher_ops.cpp and fused_cpu.cpp)
  with a fake (shape-only) implementation registered here;
- attention receives `DecodeTensors` (slot mapping, block tables, sequence lengths as tensors) instead of
  the Python lists in AttentionMetadata, which Dynamo would guard on (a recompile per step); the KV write
  is one op that mutates the cache in place (`frugal::write_kv_cache`, declared `Tensor(a!)`), so
  Inductor never copies the cache;
- guards on the model's modules and parameters are skipped (`skip_guard_on_all_nn_modules_unsafe`): the
  model does not change after loading, and each instance compiles its own copy of the step function, so
  two engines in one process never share compiled code.

Everything else (prefill chunks, mixed batches, speculative and tree rows) runs eagerly: those steps
are dominated by kernel time. Batch 1 gets its own graph (Dynamo specialises size 1); larger decode
batches share one dynamic graph; sequence length and cache size never recompile (block tables are
padded to two columns, duck sizing is off). Output is the same as eager: the compiled step calls the same
kernels on the same inputs (tests/runner/test_compiled_decode.py checks greedy output token for token).
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import nn

from frugal.layers.attention_metadata import AttentionMetadata, DecodeTensors

logger = logging.getLogger(__name__)

# Inductor options: the C++ wrapper removes the Python of the generated code; the size/stride asserts
# it would emit around every extern kernel call cost more than the rest of the wrapper. `cpp.threads: 1`
# keeps Inductor's own (tiny, decode-sized) loops out of OpenMP: its worker threads competed with the
# kernels' work-sharing helpers for 2 cores (TinyLlama INT4, 2 threads: compiled 30.7 tok/s against 37
# eager before, 35.7-36.7 against 35.8 after; `frugal bench decode ... --compile`).
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False, "cpp.threads": 1}


_fakes_registered = False


def register_fake_ops() -> bool:
    """Shape-only implementations of frugal's CPU ops, so Dynamo can trace calls to them (registered
    once per process). Returns False when the ops are not loaded (no compiled kernels)."""
    global _fakes_registered
    if _fakes_registered:
        return True
    ops = getattr(torch.ops, "frugal", None)
    try:
        for name in ("int4_linear", "int4_x16_linear", "int8_linear", "int8_x16_linear", "bf16_linear", "write_kv_cache", "rms_norm",
                     "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "paged_attention_decode"):
            getattr(ops, name)
    except (AttributeError, RuntimeError):
        return False

    def rows(x: torch.Tensor, weight_rows: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight_rows)  # [n, N]

    fakes = {
        "frugal::int4_linear": lambda x, qweight, scales, zeros, group_size, bias, max_rows:
            rows(x, qweight.shape[0]),
        "frugal::int4_x16_linear": lambda x, qweight, scales, zeros, group_size, bias, max_rows:
            rows(x, qweight.shape[0]),
        "frugal::int8_linear": lambda x, qweight, scales, bias, max_rows: rows(x, qweight.shape[0]),
        "frugal::int8_x16_linear": lambda x, qweight, scales, bias, max_rows: rows(x, qweight.shape[0]),
        "frugal::bf16_linear": lambda x, weight, bias, max_rows: rows(x, weight.shape[0]),
        "frugal::write_kv_cache": lambda kv_cache, key, value, slot_mapping: None,
        "frugal::rms_norm": lambda x, weight, eps: torch.empty_like(x),
        "frugal::fused_add_rms_norm": lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)),
        "frugal::rotary_embedding": lambda positions, q, k, cos, sin: (torch.empty_like(q), torch.empty_like(k)),
        "frugal::silu_and_mul": lambda x: x.new_empty(*x.shape[:-1], x.shape[-1] // 2),
        "frugal::paged_attention_decode": lambda q, kv_cache, block_tables, seq_lens, scale, window:
            torch.empty_like(q),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(name)(fake)
    _fakes_registered = True
    return True


def decode_tensors(md: AttentionMetadata) -> DecodeTensors:
    """The tensor-only view of a decode-only step's metadata. Block tables are padded to at least two
    columns (zeros: never read, the kernel stops at seq_len) so a one-block table does not make
    Dynamo specialise on width 1."""
    block_tables = md.block_tables
    if block_tables.shape[1] < 2:
        block_tables = F.pad(block_tables, (0, 2 - block_tables.shape[1]))
    return DecodeTensors(md.slot_mapping, block_tables,
                         torch.tensor(md.seq_lens, dtype=torch.int64, device=md.slot_mapping.device))


def compile_supported(model: nn.Module) -> str | None:
    """None when `model`'s decode step can be compiled here, else why not."""
    from frugal.layers.attention import Attention
    from frugal.layers.attention_backends import CpuPagedAttentionBackend

    if not register_fake_ops():
        return "frugal's CPU kernels are not loaded"
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if not attentions or not all(isinstance(m.backend, CpuPagedAttentionBackend) for m in attentions):
        return "the compiled decode step needs the 'cpu' attention backend"
    return None


class CompiledDecode:
    """Callable like the model (`(input_ids, positions, kv_caches, attn_metadata) -> hidden_states`):
    decode-only steps run the compiled body, every other step the eager model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        body = type(self)._body
        # A private code object: Dynamo caches compiled code per code object, and the module guards are
        # skipped, so sharing one between two models would run one model's graph for the other.
        fresh = types.FunctionType(body.__code__.replace(), body.__globals__, body.__name__)
        options = dict(INDUCTOR_OPTIONS, guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe)
        self._compiled = torch.compile(types.MethodType(fresh, self), dynamic=True, options=options)
        self._seen_batches: set[bool] = set()  # graphs compiled so far: batch 1 (True) / larger (False)

    def _body(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
              tensors: DecodeTensors) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, tensors)

    def _run(self, *args) -> torch.Tensor:
        # No duck sizing: sizes that happen to be equal when a graph is traced (block-table width 2 and
        # the cache's K/V dimension, 3 blocks and 3 KV heads, ...) would otherwise be assumed equal
        # forever, and a recompile follows the first time they differ.
        # (Set and restored around each call: ~7 us, a third of what `fx_config.patch` costs.)
        duck_shape, fx_config.use_duck_shape = fx_config.use_duck_shape, False
        try:
            return self._compiled(*args)
        finally:
            fx_config.use_duck_shape = duck_shape

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata) -> torch.Tensor:
        md = attn_metadata
        if not md.is_decode_only or md.num_tokens != input_ids.shape[0]:
            return self.model(input_ids, positions, kv_caches, md)
        batch_one = md.num_reqs == 1
        if batch_one in self._seen_batches:
            return self._run(input_ids, positions, kv_caches, decode_tensors(md))
        start = time.perf_counter()
        out = self._run(input_ids, positions, kv_caches, decode_tensors(md))
        self._seen_batches.add(batch_one)
        logger.info("compiled the decode step for batch %s in %.1f s", "1" if batch_one else ">1",
                    time.perf_counter() - start)
        return out
