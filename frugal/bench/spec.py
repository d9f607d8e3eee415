"""`frugal bench spec`: wall-clock speedup of speculative decoding over plain decoding, same run.

For each batch size B, the first `num_prompts` Spec-Bench questions (first turn, cut to
`prompt_tokens` tokens) are generated greedily, `max_tokens` each, B at a time (max_num_seqs = B),
with plain decoding and with each speculative method (every engine loaded and warmed up first,
the configurations timed in turn, `repeats` rounds, best kept). Greedy speculative output must equal the plain
output (recorded as `identical_to_plain`); the speedup is plain time / speculative time. Also
recorded: tokens per target pass and acceptance by chain position, summed over the requests.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def load_spec_bench_prompts(path: Path | str, num_prompts: int) -> list[str]:
    """First turns of the first `num_prompts` rows of a Spec-Bench `question.jsonl`."""
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["turns"][0])
            if len(prompts) >= num_prompts:
                break
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _generate_all(llm, prompts: list[list[int]], batch: int, params) -> tuple[float, list]:
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += llm.generate(prompts[i:i + batch], params)
    return time.perf_counter() - start, outputs


def _aggregate(stats: list) -> dict:
    stats = [s for s in stats if s is not None]
    steps = sum(s.num_target_steps for s in stats)
    verify_steps = sum(s.num_verify_steps for s in stats)
    width = max((len(s.proposed_by_position) for s in stats), default=0)
    proposed = [sum(s.proposed_by_position[i] for s in stats if i < len(s.proposed_by_position)) for i in range(width)]
    accepted = [sum(s.accepted_by_position[i] for s in stats if i < len(s.accepted_by_position)) for i in range(width)]
    return {
        "target_steps": steps,
        "verify_steps": verify_steps,
        "tokens_per_target_step": sum(s.num_generated_tokens for s in stats) / steps if steps else None,
        "accepted_per_verify_step": sum(s.num_accepted_tokens for s in stats) / verify_steps if verify_steps else None,
        "proposed_tokens": sum(proposed),
        "accepted_tokens": sum(accepted),
        "acceptance_by_position": [a / p if p else None for a, p in zip(accepted, proposed)],
    }


def run(model: str, methods: list[str], prompts_file: str, batch_sizes: list[int], num_prompts: int,
        prompt_tokens: int, max_tokens: int, repeats: int, threads: int, dtype: str, command: str) -> dict:
    import torch

    from frugal import LLM, SamplingParams

    torch.set_num_threads(threads)
    texts = load_spec_bench_prompts(prompts_file, num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    warmup = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = {"command": command, "model": model, "prompts_file": prompts_file, "num_prompts": len(texts),
               "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "repeats": repeats, "threads": threads,
               "dtype": dtype, "machine": {"platform": platform.platform(), "processor": platform.processor()},
               "runs": []}
    for batch in batch_sizes:
        names = ["plain", *methods]
        llms = {name: LLM(model, dtype=dtype, kv_cache_memory="512MiB", max_num_seqs=batch,
                          max_model_len=prompt_tokens + max_tokens + 16,
                          speculative=None if name == "plain" else name) for name in names}
        prompts = [llms["plain"].tokenizer.encode(t)[:prompt_tokens] for t in texts]
        for llm in llms.values():
            llm.generate(prompts[:batch], warmup)
        best = {name: float("inf") for name in names}
        outputs: dict[str, list] = {}
        # Interleaved repeats (plain, m1, m2, plain, ...): load drift on a shared machine hits all alike.
        for _ in range(repeats):
            for name in names:
                seconds, outputs[name] = _generate_all(llms[name], prompts, batch, params)
                best[name] = min(best[name], seconds)
        plain_tokens = [o.outputs[0].token_ids for o in outputs["plain"]]
        for name in names:
            num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs[name])
            row = {"batch": batch, "method": name, "seconds": best[name], "output_tokens": num_tokens,
                   "tokens_per_s": num_tokens / best[name]}
            if name != "plain":
                row["speedup"] = best["plain"] / best[name]
                row["identical_to_plain"] = [o.outputs[0].token_ids for o in outputs[name]] == plain_tokens
                row.update(_aggregate([o.metrics.spec for o in outputs[name]]))
                proposer = llms[name].engine.spec.proposer
                if getattr(proposer, "overlap", False):  # tree drafting during verification (warm-up and repeats)
                    row["prefetch_hits"] = proposer.num_prefetch_hits
                    row["prefetch_misses"] = proposer.num_prefetch_misses
                logger.info("batch %d %s: %.2fs, speedup %.2fx, %.2f tokens per target pass", batch, name,
                            best[name], row["speedup"], row["tokens_per_target_step"] or 0)
            results["runs"].append(row)
        del llms
    return results


def plot(results: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["method"] != "plain"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    batches = list(dict.fromkeys(r["batch"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = {r["batch"]: r for r in runs if r["method"] == method}
        xs = [b + (i - (len(methods) - 1) / 2) * width for b in range(len(batches))]
        label = method if len(method) < 40 else method[:37] + "..."
        axes[0].bar(xs, [rows[b]["speedup"] for b in batches], width, label=label)
        axes[1].bar(xs, [rows[b]["tokens_per_target_step"] or 0 for b in batches], width, label=label)
    for ax, title in zip(axes, ("wall-clock speedup vs plain (same run)", "tokens per target pass")):
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}: greedy, {results['max_tokens']} tokens x "
                 f"{results['num_prompts']} Spec-Bench prompts", fontsize=9)
    fig.text(0.01, 0.01, results["command"], fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(results, out_dir, name, lambda png: plot(results, png))
