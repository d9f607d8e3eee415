"""Where a decode step's time goes: `frugal bench decode MODEL --profile [--no-native-decode]`.

Runs batch-1 greedy decoding on the engine and splits the wall time of a step into parts.

- Native step (default, frugal.runner.native_decode): the DecodeStack times each kernel call itself
  (norms, each projection, rotary + KV write, attention, SiLU, LM head), and each projection's part gets
  the bytes it reads per step (packed weights, scales, zero points, bias) and so its GB/s, to set beside
  the bench's bandwidth probe: the roofline gap, part by part. What is left of the step is the embedding
  lookup and glue around the stack, then the engine (scheduler, sampler, detokeniser, Python).
- Eager step (`native_decode=False`): the linear kernels, the attention kernel, the other fused ops and
  the rest (PyTorch glue ops, Python, scheduler, sampler, detokeniser), timed by wrapping the modules.

Timing adds well under a microsecond per call natively and a few microseconds per call eagerly, so the
step total is slightly above the benchmark's.
"""

from __future__ import annotations

import time
from collections import defaultdict

_PROJECTIONS = {"qkv_proj": ("self_attn", "qkv_proj"), "o_proj": ("self_attn", "o_proj"),
                "gate_up_proj": ("mlp", "gate_up_proj"), "down_proj": ("mlp", "down_proj")}


class _Timed:
    """Wraps callables, accumulating wall time per category."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn, category: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[category] += time.perf_counter() - start
                self.calls[category] += 1

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _spec_bytes(module) -> int:
    """Bytes one call of a Linear's native kernel reads: its weight, scales, zero points and bias."""
    spec = module.linear_method.native_spec(module)
    tensors = [spec.weight, spec.scales, spec.zeros, getattr(module, "bias", None)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bytes_per_step(model, kv_bytes_per_position: int, mean_context: float) -> dict[str, int]:
    """What each part of a native batch-1 step reads: every layer's projections, the LM head, the KV cache."""
    counted = {name: 0 for name in _PROJECTIONS}
    for layer in model.model.layers:
        for name, (block, attr) in _PROJECTIONS.items():
            counted[name] += _spec_bytes(getattr(getattr(layer, block), attr))
    if model.lm_head.linear_method.native_spec(model.lm_head) is not None:
        counted["lm_head"] = _spec_bytes(model.lm_head)
    counted["attention"] = int(kv_bytes_per_position * mean_context)
    return counted


def _engine(model_dir, quantization, dtype, prompt_len, steps, native_decode: bool):
    from frugal import LLM

    return LLM(str(model_dir), dtype=dtype, quantization=quantization, kv_cache_memory="1GiB",
               max_model_len=prompt_len + steps + 32, max_num_batched_tokens=max(2048, prompt_len),
               native_decode=native_decode).engine


def _run_steps(engine, prompt_len: int, steps: int, before_timing) -> float:
    """Prefill + 4 warm-up decode steps, `before_timing()`, then `steps` timed steps: seconds."""
    from frugal import SamplingParams
    from frugal.bench.decode import random_prompt

    prompt = random_prompt(prompt_len, engine.arch.vocab_size)
    engine.add_request("profile", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    for _ in range(5):  # prefill, then warm-up decode steps
        engine.step()
    before_timing()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    engine.abort_request("profile")
    return total


def _profile_eager(engine, prompt_len: int, steps: int) -> dict:
    timer = _Timed()
    wrapped_methods = set()
    for module in engine.model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None and id(method) not in wrapped_methods:
            wrapped_methods.add(id(method))
            method.apply = timer.wrap(method.apply, "linear kernels")
        backend = getattr(module, "backend", None)
        if backend is not None and hasattr(backend, "forward") and not getattr(backend, "_profiled", False):
            backend.forward = timer.wrap(backend.forward, "attention")
            backend._profiled = True
        for name in ("_forward_method", "forward"):
            if type(module).__name__ in ("RMSNorm", "RotaryEmbedding", "SiluAndMul") and name in module.__dict__:
                setattr(module, name, timer.wrap(module.__dict__[name], "norm / rotary / silu"))
    total = _run_steps(engine, prompt_len, steps, timer.clear)
    parts = {name: seconds / steps * 1e3 for name, seconds in timer.seconds.items()}
    parts["rest (glue ops, Python, scheduler, sampler)"] = total / steps * 1e3 - sum(parts.values())
    return {"decode_path": "eager", "step_ms": total / steps * 1e3, "ms_per_step": parts,
            "calls_per_step": {k: v / steps for k, v in timer.calls.items()}}


def _profile_native(engine, prompt_len: int, steps: int) -> dict:
    from frugal.runner.kv_cache import kv_cache_bytes_per_block

    runner = engine.runner
    native, logits = runner.model_forward, runner.compute_logits
    stack, timer = native.stack, _Timed()
    runner.model_forward, runner.compute_logits = timer.wrap(native, "forward"), timer.wrap(logits, "logits")

    def start_timing() -> None:
        timer.clear()
        stack.reset_profile()
        stack.profiling = True
        native.num_native_steps = 0

    try:
        total = _run_steps(engine, prompt_len, steps, start_timing)
    finally:
        stack.profiling = False
        runner.model_forward, runner.compute_logits = native, logits
    if native.num_native_steps != steps:
        raise RuntimeError(f"only {native.num_native_steps} of {steps} decode steps ran natively")
    kernel_s = {name: seconds for name, (calls, seconds) in stack.profile().items()}
    calls = {name: calls / steps for name, (calls, seconds) in stack.profile().items()}
    parts = {name: seconds / steps * 1e3 for name, seconds in kernel_s.items()}
    parts["embedding + glue around the stack"] = (
        (timer.seconds["forward"] + timer.seconds["logits"] - sum(kernel_s.values())) / steps * 1e3)
    parts["rest (scheduler, sampler, detokeniser, Python)"] = (
        (total - timer.seconds["forward"] - timer.seconds["logits"]) / steps * 1e3)
    mean_context = prompt_len + 4 + (steps + 1) / 2  # cached positions each timed step attends to, on average
    kv_per_position = kv_cache_bytes_per_block(engine.arch, 1, engine.dtype)
    read = bytes_per_step(engine.model, kv_per_position, mean_context)
    gb_per_s = {name: read[name] / (parts[name] / 1e3) / 1e9 for name in read if parts.get(name)}
    return {"decode_path": "native", "step_ms": total / steps * 1e3, "ms_per_step": parts,
            "calls_per_step": calls, "bytes_per_step": read, "gb_per_s": gb_per_s}


def profile_decode(model_dir: str, quantization=None, dtype: str = "bfloat16", prompt_len: int = 512,
                   steps: int = 64, threads: int = 2, native_decode: bool = True) -> dict:
    import torch

    from frugal.bench.roofline import measure_bandwidth
    from frugal.runner.native_decode import NativeDecode

    torch.set_num_threads(threads)
    engine = _engine(model_dir, quantization, dtype, prompt_len, steps, native_decode)
    if isinstance(engine.runner.model_forward, NativeDecode):
        result = _profile_native(engine, prompt_len, steps)
        result["bandwidth"] = measure_bandwidth(threads, size_mib=512)
    else:
        result = _profile_eager(engine, prompt_len, steps)
    quant = getattr(engine.model, "quant_config", None)
    return {"model": str(model_dir), "quantization": quant.name if quant else None, "threads": threads,
            "prompt_len": prompt_len, "steps": steps, **result}


def plot_profile(result: dict, png_path, title: str) -> None:
    """One horizontal bar per part (ms per step), labelled with its GB/s where it streams bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = sorted(result["ms_per_step"].items(), key=lambda item: item[1])
    rates = result.get("gb_per_s", {})
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(parts) + 1.6))
    ax.barh(range(len(parts)), [ms for _, ms in parts],
            color=["tab:green" if name in rates else "tab:gray" for name, _ in parts])
    ax.set_yticks(range(len(parts)), [name for name, _ in parts], fontsize=8)
    for i, (name, ms) in enumerate(parts):
        ax.text(ms, i, f" {ms:.2f} ms" + (f", {rates[name]:.1f} GB/s" if name in rates else ""), va="center",
                fontsize=7)
    probe = result.get("bandwidth", {}).get("bandwidth_gb_s")
    ax.set_xlabel("ms per decode step")
    ax.set_title(f"{title}: {result['step_ms']:.2f} ms/step ({result['decode_path']}, {result['threads']} threads"
                 + (f"; probe {probe:.1f} GB/s" if probe else "") + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
