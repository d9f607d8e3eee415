"""`frugal bench decode|prefill`: frugal's batch-1 speed on one checkpoint, with peak memory and the
fraction of the memory-bandwidth roofline.

Prefill: prompt tokens / time to the first token of one `prompt_len`-token prompt (one step).
Decode: tokens after the first / time, generating `gen_len` tokens greedily (ignore_eos).
Each number is the best of `repeats` runs after a warm-up, with the prefix cache reset between runs;
peak RSS is this process's high-water mark (VmHWM), so run one configuration per process when comparing
memory (the peers benchmark does).
"""

from __future__ import annotations

import logging
import platform
import random
import resource
from pathlib import Path

logger = logging.getLogger(__name__)


def random_prompt(prompt_len: int, vocab_size: int, seed: int = 0) -> list[int]:
    """A reproducible prompt: BOS-like id 1 then uniform ids in [3, vocab_size)."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab_size) for _ in range(prompt_len - 1)]


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM (per address space, so a worker started by a big
    parent does not inherit the parent's peak, as getrusage's ru_maxrss does across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def machine_description() -> str:
    """The CPU model and the vector extensions the kernels care about, e.g. 'Intel(R) Xeon(R) Processor
    (avx512f avx512_vnni avx512_bf16 amx_int8)': benchmark JSONs from different sessions may come from
    different machines."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first CPU's entry: "model name" comes before "flags"
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    present = set(value.split())
                    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                             if f in present]
                    break
    except OSError:
        pass
    return f"{model} ({' '.join(flags)})" if flags else model


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def decode_path(model_forward, model) -> str:
    """'native', 'compiled' or 'eager': what ran the engine's decode steps."""
    from frugal.runner.native_decode import NativeDecode

    if model_forward is model:
        return "eager"
    return "native" if isinstance(model_forward, NativeDecode) else "compiled"


def measure_frugal(model_dir: Path | str, quantization=None, dtype: str = "bfloat16", prompt_len: int = 512,
                   gen_len: int = 128, repeats: int = 2, threads: int = 2, prompt: list[int] | None = None,
                   compile: bool = False, quant_activations: str = "int8", native_decode: bool = True) -> dict:
    """Our engine, in this process. Returns tokens/s, memory and bytes read per decoded token.
    `compile`: torch.compile'd decode steps (compiled during the warm-up, so not timed).
    `native_decode`: decode steps as one C++ call (frugal.runner.native_decode) where the model qualifies.
    `quant_activations`: 'int8' (the VNNI kernel, default) or 'exact' (see frugal.config.ModelConfig)."""
    import torch

    from frugal import LLM, SamplingParams
    from frugal.bench.roofline import decode_bytes_per_token
    from frugal.runner.kv_cache import kv_cache_bytes_per_block

    torch.set_num_threads(threads)
    rss_before = current_rss_bytes()
    llm = LLM(str(model_dir), dtype=dtype, quantization=quantization, kv_cache_memory="1GiB",
              max_model_len=prompt_len + gen_len + 16, max_num_batched_tokens=max(2048, prompt_len), compile=compile,
              quant_activations=quant_activations, native_decode=native_decode)
    engine = llm.engine
    rss_loaded = current_rss_bytes()
    prompt = prompt or random_prompt(prompt_len, engine.arch.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    llm.generate([prompt[:32]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    best_prefill, best_decode, output = 0.0, 0.0, []
    for _ in range(repeats):
        engine.scheduler.kv_cache_manager.reset_prefix_cache()
        result = llm.generate([prompt], params)[0]
        best_prefill = max(best_prefill, result.metrics.prefill_tokens_per_s or 0.0)
        best_decode = max(best_decode, result.metrics.decode_tokens_per_s or 0.0)
        output = result.outputs[0].token_ids
    kv_per_position = kv_cache_bytes_per_block(engine.arch, 1, engine.dtype)
    traffic = decode_bytes_per_token(engine.model, kv_per_position, len(prompt) + gen_len / 2)
    quant = getattr(engine.model, "quant_config", None)
    return {
        "engine": "frugal", "quantization": quant.name if quant else None, "dtype": str(engine.dtype).split(".")[-1],
        "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode,
        "peak_rss_bytes": peak_rss_bytes(), "rss_model_loaded_bytes": rss_loaded - rss_before,
        "decode_bytes_per_token": traffic["total_bytes"], "traffic": traffic, "output_token_ids": output,
        "attention_backend": type(engine.model.model.layers[0].self_attn.attn.backend).__name__,
        "decode_path": decode_path(engine.runner.model_forward, engine.model),
        "quant_activations": ("int8" if any(getattr(m, "int4_x16", False) or getattr(m, "int8_x16", False)
                                            for m in engine.model.modules()) else "exact") if quant else None,
    }


def run_bench(model_dir: Path, quantization, dtype: str, prompt_len: int, gen_len: int, repeats: int, threads: int,
              command: str, compile: bool = False, quant_activations: str = "int8",
              native_decode: bool = True) -> dict:
    from frugal.bench.roofline import roofline_fraction
    from frugal.bench.worker import run_in_subprocess

    # In its own process: the probe's buffers must not count in this process's peak RSS.
    bandwidth = run_in_subprocess({"engine": "bandwidth", "threads": threads})
    row = measure_frugal(model_dir, quantization, dtype, prompt_len, gen_len, repeats, threads, compile=compile,
                         quant_activations=quant_activations, native_decode=native_decode)
    row["roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], row["decode_bytes_per_token"],
                                                 bandwidth["bandwidth_gb_s"])
    row.pop("output_token_ids")
    return {"command": command, "model": str(model_dir), "prompt_len": prompt_len, "gen_len": gen_len,
            "threads": threads, "machine": machine_description(), "bandwidth": bandwidth,
            "runs": [row]}


def plot_rows(results: dict, png_path: Path, title: str) -> None:
    """Bars of prefill and decode tokens/s per row label (row['label'] or engine + quantization)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"]
    labels = [(row.get("label") or f"{row['engine']} {row.get('quantization') or row.get('dtype')}").replace(" ", "\n")
              for row in rows]
    colors = ["tab:green" if row["engine"] == "frugal" else "tab:blue" if row["engine"] == "llama.cpp"
              else "tab:gray" for row in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, min(16, 1.2 * len(rows))), 8))
    for ax, key, name in ((axes[0], "prefill_tokens_per_s", f"prefill ({results['prompt_len']} tokens)"),
                          (axes[1], "decode_tokens_per_s", f"decode (batch 1, {results['gen_len']} tokens)")):
        values = [row[key] for row in rows]
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_ylim(0, 1.25 * max(values, default=1.0))  # room for the labels above the bars
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        for i, (value, row) in enumerate(zip(values, rows)):
            text = f"{value:.1f}"
            if key == "decode_tokens_per_s" and row.get("roofline_fraction") is not None:
                text += f"\n{100 * row['roofline_fraction']:.0f}% roof"
                if row.get("roofline_fraction_vs_observed") is not None:  # peers: vs the best any engine streamed
                    text += f"\n{100 * row['roofline_fraction_vs_observed']:.0f}% best"
            ax.text(i, value, text, ha="center", va="bottom", fontsize=7)
        ax.set_title(name)
        ax.set_ylabel("tokens/s")
    bandwidth = results.get("bandwidth", {}).get("bandwidth_gb_s")
    best = results.get("bandwidth", {}).get("best_observed_gb_s")
    fig.suptitle(f"{title}, {results['threads']} threads" + (f", {bandwidth:.1f} GB/s read probe" if bandwidth else "")
                 + (f", {best:.1f} GB/s best streamed by an engine" if best else ""))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_results(results: dict, out_dir: Path, name: str, title: str) -> tuple[Path, Path]:
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(results, out_dir, name, lambda png: plot_rows(results, png, title))
