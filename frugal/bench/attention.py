"""`frugal bench attention`: the paged decode-attention kernel alone, AVX-512 against AMX tiles.

One decode query per call over `context` cached positions in bf16, blocks of `block_size` in shuffled order
(as a long-running cache leaves them), for each named model shape. Both paths run in the same process,
alternating round by round (`set_amx_attention`), so a busy machine slows both alike. `layers` separate
caches are walked per round: 1 keeps K/V in the CPU's caches (the kernel's compute), many (e.g. 64) make
them come from memory, as in a real decode step where the weights have evicted them.
"""

from __future__ import annotations

import statistics
import time

from frugal.bench.shapes import SHAPES


def measure_attention(num_heads: int, num_kv_heads: int, head_dim: int, context: int, block_size: int = 16,
                      threads: int = 2, layers: int = 1, rounds: int = 20, calls_per_round: int = 1000,
                      seed: int = 0) -> dict:
    """Microseconds per call of each path, per round: {'avx512_us': [...], 'amx_us': [...] or None}."""
    import torch

    from frugal.quant.kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("frugal's CPU kernels are not built here (see `python -m frugal.quant.kernels`)")
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = -(-context // block_size)
    caches = [torch.randn(2, 2 * num_blocks, block_size, num_kv_heads, head_dim, generator=generator
                          ).to(torch.bfloat16) for _ in range(layers)]
    block_table = torch.randperm(2 * num_blocks, generator=generator)[:num_blocks].view(1, -1)
    seq_lens = torch.tensor([context])
    query = torch.randn(1, num_heads, head_dim, generator=generator).to(torch.bfloat16)
    attention, scale = torch.ops.frugal.paged_attention_decode, head_dim ** -0.5
    repeats = max(1, calls_per_round // layers)

    def one_round() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            for cache in caches:
                attention(query, cache, block_table, seq_lens, scale, 0)
        return (time.perf_counter() - start) / (repeats * layers) * 1e6

    paths = [False, True] if kernels.amx_attention_available() else [False]
    times: dict[bool, list[float]] = {path: [] for path in paths}
    enabled = kernels.amx_attention_enabled()
    try:
        for path in paths:  # warm-up
            kernels.set_amx_attention(path)
            one_round()
        for _ in range(rounds):
            for path in paths:
                kernels.set_amx_attention(path)
                times[path].append(one_round())
    finally:
        kernels.set_amx_attention(enabled)
    return {"avx512_us": times[False], "amx_us": times.get(True)}


def run_attention_bench(shapes: list[str], contexts: list[int], layer_counts: list[int], threads: int, rounds: int,
                        command: str, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from frugal.bench.decode import machine_description

    cases = [(shape, context, layers) for shape in shapes for context in contexts for layers in layer_counts]
    rows = []
    for shape, context, layers in tqdm(cases, desc="attention", disable=not progress):
        config = SHAPES[shape]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config["hidden_size"] // heads
        times = measure_attention(heads, kv_heads, head_dim, context, threads=threads, layers=layers, rounds=rounds)
        row = {"shape": shape, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
               "context": context, "layers": layers, **times,
               "kv_bytes": 2 * context * kv_heads * head_dim * 2}
        for path in ("avx512", "amx"):
            if row[f"{path}_us"]:
                row[f"{path}_median_us"] = statistics.median(row[f"{path}_us"])
                row[f"{path}_min_us"] = min(row[f"{path}_us"])
        if row.get("amx_median_us"):
            row["amx_speedup_median"] = row["avx512_median_us"] / row["amx_median_us"]
        rows.append(row)
    return {"command": command, "machine": machine_description(), "threads": threads, "rounds": rounds,
            "block_size": 16, "rows": rows}


def plot_attention(results: dict, png_path, title: str) -> None:
    """Median microseconds per call, AVX-512 and AMX side by side, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows)), 4.5))
    for offset, path, color in ((-0.2, "avx512", "tab:blue"), (0.2, "amx", "tab:green")):
        values = [row.get(f"{path}_median_us") or 0.0 for row in rows]
        label = "AMX where the shape takes it (4-16 heads per KV head), else AVX-512 again" if path == "amx" else path
        ax.bar([i + offset for i in range(len(rows))], values, width=0.4, color=color, label=label)
        for i, value in enumerate(values):
            if value:
                ax.text(i + offset, value, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [f"{r['shape']}\nctx {r['context']}, {r['layers']} cache(s)" for r in rows],
                  fontsize=7)
    ax.set_ylabel("µs per call (median)")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}, {results['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
