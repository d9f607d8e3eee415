"""Where a decode step's time goes: `frugal bench decode MODEL --profile`.

Runs batch-1 greedy decoding on the engine and splits the wall time of each step into: the linear
kernels (projections + LM head: the weight stream the roofline is about), the attention kernel, the
other fused ops (norms, rotary, SiLU), and the rest (PyTorch glue ops, Python, scheduler, sampler,
detokeniser), by timing every call of those kernels. Timing adds a few microseconds per call, so the
step total here is slightly above the benchmark's. It profiles the eager (Python) step: the native
step (frugal.runner.native_decode) runs the same kernels without the Python around them.
"""

from __future__ import annotations

import time
from collections import defaultdict


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


def profile_decode(model_dir: str, quantization=None, dtype: str = "bfloat16", prompt_len: int = 512,
                   steps: int = 64, threads: int = 2) -> dict:
    import torch

    from frugal import LLM, SamplingParams
    from frugal.bench.decode import random_prompt

    torch.set_num_threads(threads)
    llm = LLM(str(model_dir), dtype=dtype, quantization=quantization, kv_cache_memory="1GiB",
              max_model_len=prompt_len + steps + 32, max_num_batched_tokens=max(2048, prompt_len),
              native_decode=False)  # the Python step, whose modules can be timed one by one
    engine = llm.engine
    timer = _Timed()
    model = engine.model
    wrapped_methods = set()
    for module in model.modules():
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
    prompt = random_prompt(prompt_len, engine.arch.vocab_size)
    engine.add_request("profile", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    engine.step()  # prefill
    for _ in range(4):  # warm-up decode steps
        engine.step()
    timer.seconds.clear()
    timer.calls.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    engine.abort_request("profile")
    parts = {name: seconds / steps * 1e3 for name, seconds in timer.seconds.items()}
    parts["rest (glue ops, Python, scheduler, sampler)"] = total / steps * 1e3 - sum(parts.values())
    quant = getattr(model, "quant_config", None)
    return {"model": str(model_dir), "quantization": quant.name if quant else None, "threads": threads,
            "prompt_len": prompt_len, "steps": steps, "step_ms": total / steps * 1e3,
            "ms_per_step": parts, "calls_per_step": {k: v / steps for k, v in timer.calls.items()}}
