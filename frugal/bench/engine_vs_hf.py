"""Prefill and decode speed of frugal next to HF transformers on the same checkpoint, same run.

Prefill: time to first token of a `prompt_len`-token prompt (one forward pass over the prompt).
Decode: tokens/s of the `gen_len - 1` tokens after the first, batch 1, greedy.
Both engines get the same thread count; each number is the best of `repeats` runs.
"""

from __future__ import annotations

import gc
import logging
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _prompt(prompt_len: int, vocab_size: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [1] + [rng.randrange(3, vocab_size) for _ in range(prompt_len - 1)]


def measure_frugal(model_dir: Path, dtype: str, prompt_len: int, gen_len: int, repeats: int) -> dict:
    from frugal import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=dtype, kv_cache_memory="1GiB", max_num_batched_tokens=max(2048, prompt_len))
    prompt = _prompt(prompt_len, llm.engine.arch.vocab_size)
    llm.generate([prompt[:32]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(repeats):
        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True))[0]
        best_prefill = max(best_prefill, out.metrics.prefill_tokens_per_s or 0.0)
        best_decode = max(best_decode, out.metrics.decode_tokens_per_s or 0.0)
    del llm
    gc.collect()
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}


def measure_hf(model_dir: Path, dtype: str, prompt_len: int, gen_len: int, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    prompt = torch.tensor([_prompt(prompt_len, model.config.vocab_size)])
    best_prefill, best_decode = 0.0, 0.0
    with torch.inference_mode():
        model.generate(prompt[:, :32], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(prompt)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
            total_s = time.perf_counter() - start
            best_prefill = max(best_prefill, prompt_len / prefill_s)
            best_decode = max(best_decode, (gen_len - 1) / max(total_s - prefill_s, 1e-9))
    del model
    gc.collect()
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}


def run(model_dir: Path, dtypes: list[str], prompt_len: int, gen_len: int, repeats: int, threads: int,
        with_hf: bool, command: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    results = {"command": command, "model": str(model_dir), "prompt_len": prompt_len, "gen_len": gen_len,
               "threads": threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "runs": []}
    for dtype in dtypes:
        row = {"dtype": dtype, "frugal": measure_frugal(model_dir, dtype, prompt_len, gen_len, repeats)}
        if with_hf:
            row["hf"] = measure_hf(model_dir, dtype, prompt_len, gen_len, repeats)
            row["ratio_vs_hf"] = {k: row["frugal"][k] / row["hf"][k] for k in row["frugal"] if row["hf"][k]}
        logger.info("%s: %s", dtype, row)
        results["runs"].append(row)
    return results


def plot(results: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", f"prefill ({results['prompt_len']} tokens)"),
                           (axes[1], "decode_tokens_per_s", f"decode (batch 1, {results['gen_len']} tokens)")):
        labels, values, colors = [], [], []
        for row in results["runs"]:
            for engine, color in (("frugal", "tab:green"), ("hf", "tab:gray")):
                if engine in row:
                    labels.append(f"{engine}\n{row['dtype']}")
                    values.append(row[engine][key])
                    colors.append(color)
        ax.bar(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{Path(results['model']).name}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def write(results: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(results, out_dir, name, lambda png: plot(results, png))
