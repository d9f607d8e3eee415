"""Run llama.cpp (through llama-cpp-python's low-level API) on a GGUF file: greedy prefill + decode
timings measured the way frugal's are, and full-sequence logits for correctness checks.

Model loading passes `use_extra_bufts=False` by default: the registry build of llama-cpp-python
segfaults on Q4_0 on CPUs with AMX (GCC 12 miscompiles llama.cpp's AMX tile set-up, a known llama.cpp
bug), and that flag turns the extra buffer types off — AMX, and also the CPU weight repacking
(Q4_0 -> interleaved Q4_0x8 with its GEMM/GEMV kernels). `extra_bufts=True` keeps llama.cpp's default
(repacking on) where it does not crash; the peers benchmark measures both. llama.cpp's own log lines
are dropped (`quiet_logs`).
"""

from __future__ import annotations

import ctypes
import time
from contextlib import contextmanager

import numpy as np


_LOG_CALLBACK = None


def quiet_logs() -> None:
    """Route llama.cpp's log lines nowhere (they go to stderr otherwise)."""
    global _LOG_CALLBACK
    import llama_cpp as lc

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


@contextmanager
def llama_context(gguf_path: str, n_ctx: int, n_batch: int, threads: int, f32_kv_cache: bool = False,
                  extra_bufts: bool = False):
    """-> (llama_cpp module, model, context, n_vocab); frees both on exit. llama.cpp's KV cache is
    F16 unless `f32_kv_cache`."""
    import llama_cpp as lc

    quiet_logs()
    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    model_params.use_extra_bufts = extra_bufts
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    ctx_params = lc.llama_context_default_params()
    ctx_params.n_ctx = n_ctx
    ctx_params.n_batch = n_batch
    ctx_params.n_ubatch = n_batch
    ctx_params.n_threads = threads
    ctx_params.n_threads_batch = threads
    # Flash attention off, as llama-cpp-python's own `Llama` defaults it: the context default (AUTO) turns
    # it on for the CPU, where it cut TinyLlama Q4_0 decode from 26.1 to 17.9 tok/s here (Intel Xeon, AMX
    # build, 2 threads; prefill 146 -> 192 tok/s).
    if "flash_attn_type" in dict(ctx_params._fields_):
        ctx_params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    elif "flash_attn" in dict(ctx_params._fields_):  # older llama-cpp-python
        ctx_params.flash_attn = False
    if f32_kv_cache:
        ctx_params.type_k = ctx_params.type_v = 0  # GGML_TYPE_F32
    ctx = lc.llama_init_from_model(model, ctx_params)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    try:
        yield lc, model, ctx, n_vocab
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def _decode(lc, ctx, token_ids: list[int], want_all_logits: bool = False) -> None:
    n = len(token_ids)
    batch = lc.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, token in enumerate(token_ids):
            batch.token[i] = token
            batch.pos[i] = _decode.position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (want_all_logits or i == n - 1) else 0
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        _decode.position += n
    finally:
        lc.llama_batch_free(batch)


_decode.position = 0


def _last_logits(lc, ctx, n_vocab: int, index: int = -1) -> np.ndarray:
    pointer = lc.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))


def _reset(lc, ctx) -> None:
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    _decode.position = 0


def sequence_logits(gguf_path: str, token_ids: list[int], threads: int = 1) -> np.ndarray:
    """Logits [len(token_ids), vocab] of one forward pass over `token_ids` (F32 KV cache)."""
    size = max(len(token_ids), 16)
    with llama_context(gguf_path, size, size, threads, f32_kv_cache=True) as (lc, _, ctx, n_vocab):
        _reset(lc, ctx)
        _decode(lc, ctx, token_ids, want_all_logits=True)
        return np.stack([_last_logits(lc, ctx, n_vocab, i).copy() for i in range(len(token_ids))])


def measure(gguf_path: str, prompt: list[int], gen_len: int, repeats: int, threads: int,
            extra_bufts: bool = False) -> dict:
    """Greedy generation of `gen_len` tokens after `prompt`; best-of-`repeats` prefill tokens/s (prompt
    tokens / time to the first token's logits) and decode tokens/s (tokens after the first / time)."""
    best_prefill, best_decode, output = 0.0, 0.0, []
    with llama_context(gguf_path, len(prompt) + gen_len + 8, len(prompt), threads,
                       extra_bufts=extra_bufts) as (lc, _, ctx, n_vocab):
        _reset(lc, ctx)  # warm-up
        _decode(lc, ctx, prompt[:32])
        _decode(lc, ctx, [int(np.argmax(_last_logits(lc, ctx, n_vocab)))])
        for _ in range(repeats):
            _reset(lc, ctx)
            start = time.perf_counter()
            _decode(lc, ctx, prompt)
            token = int(np.argmax(_last_logits(lc, ctx, n_vocab)))
            first = time.perf_counter()
            output = [token]
            for _ in range(gen_len - 1):
                _decode(lc, ctx, [token])
                token = int(np.argmax(_last_logits(lc, ctx, n_vocab)))
                output.append(token)
            end = time.perf_counter()
            best_prefill = max(best_prefill, len(prompt) / (first - start))
            best_decode = max(best_decode, (gen_len - 1) / (end - first))
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode, "output_token_ids": output,
            "llama_cpp_build": {"version": lc.__version__, "system_info": lc.llama_print_system_info().decode()}}
