"""`frugal bench spec-cost`: what verifying k candidates costs the target, against decoding 1 token.

One request with a `context`-token KV cache already written; then the time of one target pass over
1 + k new positions (the verify pass of a k-chain; k = 0 is plain decoding), best of `repeats`, for
each k. From a per-token acceptance a (measured elsewhere, e.g. `frugal bench spec` on the zoo pair)
the speedup a k-chain would give with free drafting is E[tokens](a, k) / (t(k) / t(0)), with
E[tokens] = (1 - a^(k+1)) / (1 - a) (spec/adaptive.py); drafting cost comes on top.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def run(model: str, ks: list[int], context: int, repeats: int, threads: int, dtype: str, acceptance: list[float],
        command: str) -> dict:
    import torch

    from frugal import LLM
    from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
    from frugal.request import Request
    from frugal.runner.input_builder import build_model_input
    from frugal.sampling_params import SamplingParams
    from frugal.spec.adaptive import expected_tokens

    torch.set_num_threads(threads)
    max_k = max(ks)
    llm = LLM(model, dtype=dtype, kv_cache_memory="256MiB", max_num_seqs=1, max_model_len=context + max_k + 16)
    engine = llm.engine
    block_size = engine.config.cache.block_size
    num_positions = context + max_k + 1
    block_ids = list(range(-(-num_positions // block_size)))  # a private table: nothing else runs
    request = Request("cost", [1] * context, SamplingParams())
    token_ids = [(7 * i) % engine.arch.vocab_size for i in range(num_positions)]

    def forward(start: int, num_tokens: int, num_spec: int = 0) -> float:
        new_ids = token_ids[start:start + num_tokens]
        # The candidates' rows are logits rows too (the verifier reads all 1 + k).
        scheduled = ScheduledRequest(request=request, start_pos=start, num_new_tokens=num_tokens, token_ids=new_ids,
                                     block_ids=block_ids, spec_token_ids=new_ids[num_tokens - num_spec:])
        model_input = build_model_input(SchedulerOutput([scheduled], num_tokens), block_size, engine.device)
        begin = time.perf_counter()
        with torch.inference_mode():
            engine.runner.forward_logits(model_input)
        return time.perf_counter() - begin

    forward(0, context)  # write the context's KV (and warm up)
    seconds = {}
    for _ in range(repeats):  # interleaved rounds: load drift hits every k alike
        for k in ks:
            elapsed = forward(context, 1 + k, k)
            seconds[k] = min(seconds.get(k, float("inf")), elapsed)
    base = seconds[min(ks)] if 0 not in seconds else seconds[0]
    rows = []
    for k in ks:
        row = {"k": k, "seconds": seconds[k], "cost_vs_plain": seconds[k] / base}
        for a in acceptance:
            row[f"speedup_at_acceptance_{a}"] = expected_tokens(a, k) / row["cost_vs_plain"]
        rows.append(row)
        logger.info("k=%d: %.1f ms, %.2fx a plain step", k, seconds[k] * 1e3, row["cost_vs_plain"])
    return {"command": command, "model": model, "context": context, "repeats": repeats, "threads": threads,
            "dtype": str(engine.dtype), "machine": {"platform": platform.platform()}, "rows": rows}


def write(results: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2))
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["k"] for r in rows]
    axes[0].plot(ks, [r["cost_vs_plain"] for r in rows], "o-")
    axes[0].set_xlabel("candidates verified (k)")
    axes[0].set_title("target pass time / plain decode step")
    for key in [k for k in rows[0] if k.startswith("speedup_at_acceptance_")]:
        axes[1].plot(ks, [r[key] for r in rows], "o-", label="a = " + key.rsplit("_", 1)[1])
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_xlabel("k")
    axes[1].set_title("speedup with free drafting")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}, context {results['context']}, {results['dtype']}", fontsize=9)
    fig.text(0.01, 0.01, results["command"], fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png_path = out_dir / f"{name}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
