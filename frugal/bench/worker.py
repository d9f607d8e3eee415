"""One benchmark configuration in its own process (`python -m frugal.bench.worker SPEC_JSON`), so peak
RSS and thread pools are its own. Prints one line `FRUGAL_BENCH_RESULT <json>` at the end.

SPEC: {"engine": "frugal" | "llama.cpp" | "hf" | "bandwidth", "threads": N, ...}; see `run_spec`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

MARKER = "FRUGAL_BENCH_RESULT "


def gguf_bytes_per_token(gguf_path: str, arch, mean_context: float) -> dict:
    """What llama.cpp reads per decoded token: every tensor but the embedding (one row; the whole table when
    it doubles as the output layer), plus its F16 KV cache."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    embedding = names.pop("token_embd.weight", 0)
    weight_bytes = sum(names.values()) + (embedding if "output.weight" not in names else 0)
    row = embedding // arch.vocab_size if "output.weight" in names else 0
    kv = int(2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * 2 * mean_context)
    return {"weight_bytes": weight_bytes, "embedding_row_bytes": row, "kv_cache_bytes": kv,
            "total_bytes": weight_bytes + row + kv}


def run_spec(spec: dict) -> dict:
    engine, threads = spec["engine"], spec.get("threads", 2)
    if engine == "bandwidth":
        from frugal.bench.roofline import measure_bandwidth

        return measure_bandwidth(threads)
    from frugal.bench.decode import current_rss_bytes, peak_rss_bytes

    prompt, gen_len, repeats = spec["prompt"], spec["gen_len"], spec.get("repeats", 2)
    if engine == "frugal":
        from frugal.bench.decode import measure_frugal

        return measure_frugal(spec["model"], spec.get("quantization"), spec.get("dtype", "bfloat16"), len(prompt),
                              gen_len, repeats, threads, prompt=prompt,
                              quant_activations=spec.get("quant_activations", "int8"),
                              compile=spec.get("compile", False), native_decode=spec.get("native_decode", True))
    from frugal.model.arch_config import load_arch_config

    arch = load_arch_config(spec["model"])
    mean_context = len(prompt) + gen_len / 2
    if engine == "llama.cpp":
        from frugal.bench.llama_cpp_runner import measure

        rss_before = current_rss_bytes()
        row = measure(spec["gguf"], prompt, gen_len, repeats, threads, extra_bufts=spec.get("extra_bufts", False))
        traffic = gguf_bytes_per_token(spec["gguf"], arch, mean_context)
        row.update(engine="llama.cpp", quantization=spec.get("label"), dtype=spec.get("label"),
                   peak_rss_bytes=peak_rss_bytes(), rss_model_loaded_bytes=None,
                   decode_bytes_per_token=traffic["total_bytes"], traffic=traffic, rss_before_bytes=rss_before)
        return row
    if engine == "hf":
        import torch

        from frugal.bench.engine_vs_hf import measure_hf

        torch.set_num_threads(threads)
        dtype = spec.get("dtype", "bfloat16")
        row = measure_hf(spec["model"], dtype, len(prompt), gen_len, repeats)
        element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        embedding = arch.vocab_size * arch.hidden_size * element
        from frugal.model.loader import iterate_weights, safetensors_files

        params = sum(t.numel() for _, t in iterate_weights(safetensors_files(spec["model"]), progress=False))
        weight_bytes = params * element - (0 if arch.tie_word_embeddings else embedding)
        kv = int(2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * element * mean_context)
        row.update(engine="hf", quantization=None, dtype=dtype, peak_rss_bytes=peak_rss_bytes(),
                   decode_bytes_per_token=weight_bytes + arch.hidden_size * element + kv,
                   traffic={"weight_bytes": weight_bytes, "kv_cache_bytes": kv})
        return row
    raise ValueError(f"unknown engine {engine!r}")


def worker_env(engine: str) -> dict[str, str]:
    """The environment of a worker: peers (llama.cpp, transformers) get OpenMP's defaults back — frugal
    prefers a passive OMP_WAIT_POLICY for itself (frugal/__init__.py), and llama.cpp's OpenMP threads
    rely on spinning between ops."""
    import frugal

    env = dict(os.environ)
    if engine in ("frugal", "bandwidth"):
        return env
    if env.pop(frugal.OMP_POLICY_MARKER, None):
        env.pop("OMP_WAIT_POLICY", None)
    env["FRUGAL_OMP_DEFAULTS"] = "1"
    return env


def run_in_subprocess(spec: dict, timeout_s: float = 3600) -> dict:
    """Run `spec` in a fresh Python process; raises RuntimeError with its stderr tail on failure."""
    proc = subprocess.run([sys.executable, "-m", "frugal.bench.worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout_s, env=worker_env(spec.get("engine", "")))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = "\n".join((proc.stderr or "").splitlines()[-15:])
    how = f"exit {proc.returncode}"
    if proc.returncode < 0:  # killed by a signal: say which (SIGILL, SIGSEGV, ...)
        how += f", {signal.Signals(-proc.returncode).name}" if -proc.returncode in signal.valid_signals() else ""
    raise RuntimeError(f"benchmark worker {spec.get('engine')} failed ({how}):\n{tail}")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    result = run_spec(spec)
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
