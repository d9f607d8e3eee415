"""`frugal bench profile-prefill | step-time | policies | simulate`: the measurements behind FastServe
scheduling (issue 8), written to benchmarks/ as JSON (+ PNG) with the command that made them.

    frugal bench profile-prefill [engine options]          prefill time vs prompt length, swap bandwidth
    frugal bench step-time [engine options]                step-time model for the simulator
    frugal bench policies --trace CSV [--rate-scales ...]   real engine (in-process replay) + simulator
    frugal bench simulate --trace CSV [--rate-scales ...]   simulator only, at large scale
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from frugal.cli import invoked_command
from frugal.errors import ConfigError

logger = logging.getLogger("frugal.cli")

POLICIES = ["fcfs", "mlfq", "skip-join-mlfq", "sjf-oracle"]


def add_policy_bench_parsers(bench_sub) -> None:
    from frugal.cli.main import add_engine_args

    profile = bench_sub.add_parser("profile-prefill", help="measure prefill time vs prompt length (skip-join MLFQ)")
    profile.add_argument("--repeats", type=int, default=5)
    profile.add_argument("--out", default=None, help="JSON path (default: benchmarks/prefill_profile_<model>.json)")
    _add_common(profile)
    add_engine_args(profile)
    profile.set_defaults(func=cmd_profile_prefill)

    step = bench_sub.add_parser("step-time", help="fit the simulator's step-time model on the real engine")
    step.add_argument("--rates", type=float, nargs="+", default=[2, 10, 40, 200],
                      help="request rates of the synthetic Poisson workloads replayed")
    step.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    step.add_argument("--out", default=None, help="JSON path (default: benchmarks/step_time_<model>.json)")
    _add_common(step)
    add_engine_args(step)
    step.set_defaults(func=cmd_step_time)

    for name, func, help_text in (
            ("policies", cmd_policies, "compare scheduling policies on a trace: real engine and simulator"),
            ("simulate", cmd_simulate, "simulate scheduling policies on a trace at large scale")):
        parser = bench_sub.add_parser(name, help=help_text)
        parser.add_argument("--trace", required=True, help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens")
        parser.add_argument("--num-requests", type=int, default=300 if name == "policies" else 4000)
        parser.add_argument("--start-row", type=int, default=0)
        parser.add_argument("--rate-scales", type=float, nargs="+", default=[2.0, 4.0, 6.0],
                            help="load levels: multiples of the trace's request rate")
        parser.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
        parser.add_argument("--fit", default="clip", choices=["clip", "scale"],
                            help="fit trace lengths to the context: clip each (default) or scale all prompts")
        parser.add_argument("--prefill-profile", default=None, help="prefill profile JSON (default: measured)")
        parser.add_argument("--step-time", default=None, help="step-time model JSON (default: measured)")
        parser.add_argument("--name", default=None, help="file stem under --out-dir")
        parser.add_argument("--out-dir", default="benchmarks")
        _add_common(parser)
        add_engine_args(parser)
        if name == "simulate":
            parser.add_argument("--num-kv-blocks", type=int, default=None,
                                help="KV blocks of the simulated engine (default: from --kv-cache-memory)")
            parser.add_argument("--num-swap-blocks", type=int, default=None,
                                help="slow-tier blocks (default: from --swap-space)")
        parser.set_defaults(func=func)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                        help="time source of replays: this process's CPU time (default; immune to other "
                             "work on a shared machine) or wall time")
    parser.add_argument("--seed", type=int, default=0)


# ---- helpers -------------------------------------------------------------------------------------


def engine_config_from_args(args: argparse.Namespace):
    from frugal.cli.main import default_model
    from frugal.cli.policy_args import parse_policy_options
    from frugal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_memory

    max_model_len = args.max_model_len
    swap_space = getattr(args, "swap_space", "0")
    return EngineConfig(
        model=ModelConfig(model=args.model or default_model(), dtype=args.dtype, device=args.device,
                          max_model_len=max_model_len, attention_backend=args.attention_backend),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory_bytes=parse_memory(args.kv_cache_memory),
                          enable_prefix_caching=not args.no_prefix_caching,
                          swap_space_bytes=parse_memory(swap_space) if swap_space not in ("0", 0, None) else 0,
                          swap_path=getattr(args, "swap_path", None)),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=max_model_len or SchedulerConfig.max_model_len,
                                  policy=getattr(args, "scheduling_policy", "fcfs"),
                                  policy_options=parse_policy_options(getattr(args, "policy_option", []))),
    )


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def _model_name(config) -> str:
    return Path(config.model.model).name


def _load_or_measure_profile(args, config) -> str:
    """Path of a prefill profile JSON: --prefill-profile, or one measured now next to the results."""
    if args.prefill_profile:
        return args.prefill_profile
    path = Path(args.out_dir) / f"prefill_profile_{_model_name(config)}.json"
    logger.info("measuring a prefill profile into %s", path)
    _measure_profile(config, repeats=5, command=invoked_command(), clock=args.clock).save(path)
    return str(path)


def _load_or_measure_step_time(args, config):
    from frugal.sim.measure import measure_step_time_model
    from frugal.sim.step_time import StepTimeModel

    if args.step_time:
        return StepTimeModel.load(args.step_time)
    logger.info("measuring the step-time model (pass --step-time to reuse one)")
    return measure_step_time_model(config, [2, 10, 40, 200], 100, args.seed, args.clock, {"command": invoked_command()})


def _measure_profile(config, repeats: int, command: str, clock: str):
    import time
    from dataclasses import replace

    from frugal.engine.engine_core import EngineCore
    from frugal.engine.scheduling import measure_prefill_profile

    probe = replace(config, cache=replace(config.cache, swap_space_bytes=max(config.cache.swap_space_bytes, 2**20)))
    engine = EngineCore(probe)
    profile = measure_prefill_profile(engine.runner, engine.num_blocks, engine.max_model_len, engine.arch.vocab_size,
                                      repeats=repeats, timer=time.process_time if clock == "cpu" else time.perf_counter)
    cost_model = engine.scheduler.swap.cost_model
    import torch

    from frugal.engine.scheduling import measure_swap_overlap

    overlap = measure_swap_overlap(engine.runner, engine.swapper, num_blocks=32, num_tokens=128,
                                   vocab_size=engine.arch.vocab_size, max_model_len=engine.max_model_len)

    metadata = {"model": config.model.model, "device": str(engine.device), "dtype": str(engine.dtype),
                "threads": torch.get_num_threads(), "repeats": repeats, "clock": clock, "command": command,
                "kv_bytes_per_block": engine.swapper.bytes_per_block,
                "swap_bandwidth_bytes_per_s": cost_model.bandwidth_bytes_per_s if cost_model else None,
                "swap_overlap_wall": overlap}
    engine.swapper.close()
    return type(profile)(profile.points, metadata)


# ---- commands ------------------------------------------------------------------------------------

def cmd_profile_prefill(args: argparse.Namespace) -> int:
    _setup(args)
    config = engine_config_from_args(args)
    profile = _measure_profile(config, args.repeats, invoked_command(), args.clock)
    path = Path(args.out or f"benchmarks/prefill_profile_{_model_name(config)}.json")
    profile.save(path)
    print(json.dumps(profile.to_dict(), indent=2))
    logger.info("wrote %s", path)
    return 0


def cmd_step_time(args: argparse.Namespace) -> int:
    from frugal.sim.measure import measure_step_time_model

    _setup(args)
    if args.num_requests < 1 or not all(rate > 0 for rate in args.rates):
        raise ConfigError(f"need --num-requests >= 1 and positive --rates, got {args.num_requests}, {args.rates}")
    config = engine_config_from_args(args)
    model = measure_step_time_model(config, args.rates, args.num_requests, args.seed, args.clock,
                                    {"command": invoked_command(), "model": config.model.model})
    path = Path(args.out or f"benchmarks/step_time_{_model_name(config)}.json")
    model.save(path)
    print(json.dumps(model.to_dict(), indent=2))
    logger.info("wrote %s", path)
    return 0


def _validate_trace_args(args) -> None:
    if args.num_requests < 1 or args.start_row < 0:
        raise ConfigError(f"need --num-requests >= 1 and --start-row >= 0, got {args.num_requests}, {args.start_row}")
    if not all(scale > 0 for scale in args.rate_scales):
        raise ConfigError(f"--rate-scales must be positive, got {args.rate_scales}")


def cmd_policies(args: argparse.Namespace) -> int:
    from frugal.bench import policies

    _setup(args)
    _validate_trace_args(args)
    config = engine_config_from_args(args)
    max_model_len = _resolved_max_model_len(config)
    trace, record = policies.load_fitted_trace(Path(args.trace), args.num_requests, args.start_row, max_model_len,
                                               args.fit)
    profile_path = _load_or_measure_profile(args, config)
    step_time = _load_or_measure_step_time(args, config)
    result = policies.run_policies(config, trace, record, args.policies, args.rate_scales, step_time, profile_path,
                                   args.clock, invoked_command(), args.seed)
    name = args.name or f"policies_{_model_name(config)}_{Path(args.trace).stem}"
    json_path, png_path = policies.write(result, Path(args.out_dir), name, ("real", "sim"))
    print(json.dumps(result["ratios_vs_fcfs"], indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from frugal.bench import policies
    from frugal.core.prefill_profile import PrefillProfile
    from frugal.core.swap import SwapCostModel
    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import resolve_dtype, resolve_model_path
    from frugal.runner.kv_cache import kv_cache_bytes_per_block
    from frugal.sim.simulator import SimConfig

    _setup(args)
    _validate_trace_args(args)
    config = engine_config_from_args(args)
    max_model_len = _resolved_max_model_len(config)
    arch = load_arch_config(resolve_model_path(config.model.model))
    bytes_per_block = kv_cache_bytes_per_block(arch, config.cache.block_size,
                                               resolve_dtype(config.model.dtype, arch, torch.device(config.model.device)))
    num_blocks = args.num_kv_blocks or config.cache.kv_cache_memory_bytes // bytes_per_block
    num_swap_blocks = args.num_swap_blocks if args.num_swap_blocks is not None else \
        config.cache.swap_space_bytes // bytes_per_block
    profile = PrefillProfile.load(_load_or_measure_profile(args, config))
    bandwidth = profile.metadata.get("swap_bandwidth_bytes_per_s")
    cost_model = SwapCostModel(bytes_per_block, bandwidth, profile) if (num_swap_blocks and bandwidth) else None
    sim_base = SimConfig(scheduler=replace(config.scheduler, max_model_len=max_model_len),
                         block_size=config.cache.block_size, num_blocks=num_blocks, num_swap_blocks=num_swap_blocks,
                         swap_cost_model=cost_model, prefill_profile=profile)
    trace, record = policies.load_fitted_trace(Path(args.trace), args.num_requests, args.start_row, max_model_len,
                                               args.fit)
    step_time = _load_or_measure_step_time(args, config)
    result = policies.run_simulation(sim_base, trace, record, args.policies, args.rate_scales, step_time, profile,
                                     invoked_command())
    name = args.name or f"simulate_{_model_name(config)}_{Path(args.trace).stem}"
    json_path, png_path = policies.write(result, Path(args.out_dir), name, ("sim",))
    print(json.dumps(result["ratios_vs_fcfs"], indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def _resolved_max_model_len(config) -> int:
    """What the engine would use: --max-model-len, else the model's limit (capped by the default)."""
    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import resolve_model_path

    if config.model.max_model_len:
        return config.model.max_model_len
    limit = load_arch_config(resolve_model_path(config.model.model)).max_position_embeddings
    return min(limit, config.scheduler.max_model_len) if limit else config.scheduler.max_model_len
