"""`frugal bench policies` and `frugal bench simulate`: scheduling policies compared on the Azure LLM
trace, on the real engine (in-process replay) and in the discrete-event simulator.

`policies`: for each load level (a multiple of the trace's request rate) and each policy, replay the
same trace requests through a fresh real EngineCore (`frugal.sim.replay`) and through the simulator
configured like that engine (`frugal.sim.simulator`), and report mean/p99 JCT and TTFT of both and
the simulator's relative error. `simulate`: the simulator alone, at scales this machine cannot serve
(thousands of requests, hundreds of concurrent jobs), charting JCT against load for every policy.
Results are JSON + PNG under benchmarks/ with the command that made them.
"""

from __future__ import annotations

import logging
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

from frugal.bench.trace import TraceRequest, load_azure_trace, synthetic_prompt
from frugal.config import EngineConfig
from frugal.core.policy import policy_option_names
from frugal.sim.metrics import summarize
from frugal.sim.replay import engine_config_for, make_engine, replay
from frugal.sim.simulator import SimConfig, sim_config_from_engine, simulate
from frugal.sim.step_time import StepTimeModel
from frugal.sim.workload import fit_trace

logger = logging.getLogger(__name__)

METRICS = (("jct_s", "mean"), ("jct_s", "p99"), ("ttft_s", "mean"), ("ttft_s", "p99"))


def scale_arrivals(requests: list[TraceRequest], rate_scale: float) -> list[TraceRequest]:
    return [replace(r, arrival_s=r.arrival_s / rate_scale) for r in requests]


def load_fitted_trace(trace: Path, num_requests: int, start_row: int, max_model_len: int,
                      fit: str) -> tuple[list[TraceRequest], dict]:
    requests = load_azure_trace(trace, num_requests, start_row)
    fitted, record = fit_trace(requests, max_model_len, fit)
    record.update({"trace": str(trace), "start_row": start_row, "num_requests": len(fitted),
                   "trace_duration_s": fitted[-1].arrival_s - fitted[0].arrival_s,
                   "trace_requests_per_s": len(fitted) / max(fitted[-1].arrival_s - fitted[0].arrival_s, 1e-9)})
    return fitted, record


def policy_options_for(policy: str, prefill_profile: str | None, extra: dict | None = None) -> dict:
    options = dict(extra or {})
    if prefill_profile and "prefill_profile" in policy_option_names(policy):
        options.setdefault("prefill_profile", prefill_profile)
    return options


def _relative_errors(real: dict, sim: dict) -> dict:
    return {f"{name}.{stat}": sim[name][stat] / real[name][stat] - 1 for name, stat in METRICS}


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def run_policies(base: EngineConfig, trace_requests: list[TraceRequest], trace_record: dict, policies: list[str],
                 rate_scales: list[float], step_time: StepTimeModel, prefill_profile: str | None,
                 clock_source: str, command: str, seed: int = 0, timeout_s: float | None = None) -> dict:
    """Real replay and simulation of every (rate scale, policy) pair on the same requests."""
    runs = []
    prompts: list[list[int]] | None = None
    for rate_scale in rate_scales:
        requests = scale_arrivals(trace_requests, rate_scale)
        for policy in policies:
            config = engine_config_for(base, policy, policy_options_for(policy, prefill_profile))
            engine, clock = make_engine(config, clock_source)
            if prompts is None:
                rng = random.Random(seed)
                prompts = [synthetic_prompt(r.prompt_len, engine.arch.vocab_size, rng) for r in requests]
            _warm_up(engine, clock)
            real = replay(engine, clock, requests, prompts, timeout_s=timeout_s)
            real_summary = summarize(real.records)
            predicted = sum(step_time.predict(features) for features, _ in real.step_samples)
            measured = sum(seconds for _, seconds in real.step_samples)
            sim = simulate(requests, sim_config_from_engine(engine), step_time)
            sim_summary = summarize(sim.records)
            runs.append({
                "policy": policy, "rate_scale": rate_scale,
                "requests_per_s": trace_record["trace_requests_per_s"] * rate_scale,
                "real": real_summary, "sim": sim_summary, "sim_rel_error": _relative_errors(real_summary, sim_summary),
                "real_steps": real.num_steps, "sim_steps": sim.num_steps, "real_wall_s": real.wall_s,
                "step_model_total_time_rel_error": predicted / measured - 1 if measured else None,
                "num_swap_outs": engine.scheduler.swap.num_swap_outs,
                "num_recompute_preemptions": engine.scheduler.num_preemptions - engine.scheduler.swap.num_swap_outs,
            })
            logger.info("x%.1f %-15s real: %s | sim: %s", rate_scale, policy, format_summary(real_summary),
                        format_summary(sim_summary))
            engine.swapper.close()
            del engine
    return {"command": command, "machine": _machine(), "clock": clock_source, "engine": _engine_record(base),
            "trace": trace_record, "step_time_model": step_time.to_dict(), "runs": runs,
            "ratios_vs_fcfs": _ratios(runs, "real") if "fcfs" in policies else {}}


def run_simulation(sim_base: SimConfig, trace_requests: list[TraceRequest], trace_record: dict,
                   policies: list[str], rate_scales: list[float], step_time: StepTimeModel, prefill_profile,
                   command: str) -> dict:
    runs = []
    for rate_scale in rate_scales:
        requests = scale_arrivals(trace_requests, rate_scale)
        for policy in policies:
            options = policy_options_for(policy, None)
            scheduler_config = replace(sim_base.scheduler, policy=policy, policy_options=options)
            config = replace(sim_base, scheduler=scheduler_config, prefill_profile=prefill_profile)
            result = simulate(requests, config, step_time)
            summary = summarize(result.records)
            runs.append({"policy": policy, "rate_scale": rate_scale,
                         "requests_per_s": trace_record["trace_requests_per_s"] * rate_scale, "sim": summary,
                         "sim_steps": result.num_steps, "max_concurrency": result.max_concurrency,
                         "sim_wall_s": result.wall_s})
            logger.info("x%.1f %-15s sim: %s (max %d concurrent, %.1fs)", rate_scale, policy, format_summary(summary),
                        result.max_concurrency, result.wall_s)
    return {"command": command, "machine": _machine(), "trace": trace_record,
            "scheduler": {"max_num_seqs": sim_base.scheduler.max_num_seqs,
                          "max_num_batched_tokens": sim_base.scheduler.max_num_batched_tokens,
                          "max_model_len": sim_base.scheduler.max_model_len, "block_size": sim_base.block_size,
                          "num_blocks": sim_base.num_blocks, "num_swap_blocks": sim_base.num_swap_blocks},
            "step_time_model": step_time.to_dict(), "runs": runs,
            "ratios_vs_fcfs": _ratios(runs, "sim") if "fcfs" in policies else {}}


def _ratios(runs: list[dict], source: str) -> dict:
    """Per rate scale and policy: mean and p99 JCT as a multiple of FCFS's at the same load."""
    fcfs = {r["rate_scale"]: r[source] for r in runs if r["policy"] == "fcfs"}
    ratios: dict = {}
    for r in runs:
        base = fcfs.get(r["rate_scale"])
        if base is None:
            continue
        ratios.setdefault(str(r["rate_scale"]), {})[r["policy"]] = {
            "mean_jct_vs_fcfs": r[source]["jct_s"]["mean"] / base["jct_s"]["mean"],
            "p99_jct_vs_fcfs": r[source]["jct_s"]["p99"] / base["jct_s"]["p99"],
            "mean_ttft_vs_fcfs": r[source]["ttft_s"]["mean"] / base["ttft_s"]["mean"],
        }
    return ratios


def _warm_up(engine, clock) -> None:
    """One short request through the fresh engine (not measured): first-call overheads."""
    from frugal.sampling_params import SamplingParams

    engine.add_request("__warm_up__", [1] + [5] * 31, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       arrival_time=clock())
    while engine.has_unfinished_requests():
        engine.step()


def _engine_record(config: EngineConfig) -> dict:
    return {"model": config.model.model, "dtype": config.model.dtype, "device": config.model.device,
            "kv_cache_memory_bytes": config.cache.kv_cache_memory_bytes, "block_size": config.cache.block_size,
            "swap_space_bytes": config.cache.swap_space_bytes, "max_num_seqs": config.scheduler.max_num_seqs,
            "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
            "max_model_len": config.model.max_model_len}


def format_summary(summary: dict) -> str:
    return (f"JCT mean {summary['jct_s']['mean']:.3f}s p99 {summary['jct_s']['p99']:.3f}s, "
            f"TTFT mean {summary['ttft_s']['mean']:.3f}s p99 {summary['ttft_s']['p99']:.3f}s")


# ---- output ------------------------------------------------------------------------------------

def plot(result: dict, path: Path, sources: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
    policies = list(dict.fromkeys(r["policy"] for r in result["runs"]))
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    for ax, (name, stat) in zip(axes, METRICS):
        for policy in policies:
            runs = sorted((r for r in result["runs"] if r["policy"] == policy), key=lambda r: r["requests_per_s"])
            x = [r["requests_per_s"] for r in runs]
            for source, style in zip(sources, ("-o", "--x")):
                label = policy if len(sources) == 1 else f"{policy} ({source})"
                ax.plot(x, [r[source][name][stat] for r in runs], style, color=colors[policy], label=label)
        ax.set(title=f"{stat} {name.replace('_s', '')}", xlabel="requests/s", ylabel="seconds")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(result["command"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path, name: str, sources: tuple[str, ...]) -> tuple[Path, Path]:
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(result, out_dir, name, lambda png: plot(result, png, sources))


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
