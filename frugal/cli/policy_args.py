"""Command-line options for scheduling (policy, its options, KV swap space), shared by every command
that builds an engine, and their conversion to `LLM` / `EngineConfig` keyword arguments."""

from __future__ import annotations

import argparse
import json

from frugal.errors import ConfigError


def add_scheduling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduling")
    try:
        group.add_argument("--scheduling-policy", default="fcfs",
                           help="fcfs (default), mlfq, skip-join-mlfq or sjf-oracle (benchmark upper bound)")
    except argparse.ArgumentError:
        pass  # a command that defines it itself
    group.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                       help="policy option (repeatable), e.g. quantum_s=0.01, num_levels=8, starvation_s=2, "
                            "prefill_profile=benchmarks/prefill_profile.json")
    group.add_argument("--swap-space", default="0",
                       help="KV swap tier outside the KV budget, e.g. 1GiB (0: preemption recomputes)")
    group.add_argument("--swap-path", default=None,
                       help="directory for a memory-mapped swap file (CPU; default: host memory)")


def parse_policy_options(items: list[str]) -> dict:
    """['quantum_s=0.01', 'prefill_profile=p.json'] -> {'quantum_s': 0.01, 'prefill_profile': 'p.json'}:
    values that parse as JSON numbers (or inf) are numbers, the rest strings."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--policy-option must be KEY=VALUE, got {item!r}")
        value = value.strip()
        if value.lower() in ("inf", "infinity"):
            parsed: object = float("inf")
        else:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if not isinstance(parsed, (int, float)) or isinstance(parsed, bool):
                parsed = value
        options[key.strip()] = parsed
    return options


def scheduling_kwargs(args: argparse.Namespace) -> dict:
    """LLM keyword arguments from the parsed options (absent options keep LLM's defaults)."""
    kwargs = {"scheduling_policy": getattr(args, "scheduling_policy", "fcfs")}
    if getattr(args, "policy_option", None):
        kwargs["policy_options"] = parse_policy_options(args.policy_option)
    swap_space = getattr(args, "swap_space", "0")
    if swap_space not in (None, "0", 0):
        kwargs["swap_space"] = swap_space
    if getattr(args, "swap_path", None):
        kwargs["swap_path"] = args.swap_path
    return kwargs
