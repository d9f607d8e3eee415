"""`frugal serve`: the OpenAI-compatible server (FastAPI + uvicorn) over one AsyncEngine.

    frugal serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue N]
                 [--served-model-name NAME ...] [--drain-timeout S] [--scheduling-policy NAME]
                 [engine options: --dtype --device --kv-cache-memory --max-model-len ...]

SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests finish for at most
`--drain-timeout` seconds (then cancels them, freeing their KV blocks), stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from frugal.cli import invoked_command
from frugal.errors import ConfigError

logger = logging.getLogger("frugal.cli")


def add_serve_parser(sub) -> None:
    from frugal.cli.main import add_engine_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    group.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    group.add_argument("--api-key", default=os.environ.get("FRUGAL_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FRUGAL_API_KEY)")
    group.add_argument("--max-queue", type=int, default=None,
                       help="sequences that may wait beyond the --max-num-seqs running ones; more get 429 "
                            "(default: unbounded)")
    group.add_argument("--served-model-name", action="append", default=None,
                       help="name clients use in 'model' (repeatable; default: --model and its directory name)")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before cancelling them")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    group.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    add_engine_args(serve)
    try:
        serve.add_argument("--scheduling-policy", default="fcfs",
                           help="scheduling policy by name (validated by core.policy.make_policy)")
    except argparse.ArgumentError:
        pass  # the shared engine options already define it
    serve.set_defaults(func=cmd_serve)


def served_model_names(args: argparse.Namespace, model: str) -> tuple[str, ...]:
    if args.served_model_name:
        names = list(args.served_model_name)
    else:
        names = [model, Path(model).name]
    return tuple(dict.fromkeys(name for name in names if name))


def _validate(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.drain_timeout < 0:
        raise ConfigError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key must not be empty")


def cmd_serve(args: argparse.Namespace) -> int:
    _validate(args)
    import uvicorn

    from frugal.cli.main import build_llm, default_model
    from frugal.engine.async_engine import AsyncEngine
    from frugal.server.app import create_app
    from frugal.server.serving_common import ServerConfig

    model = args.model or default_model()
    args.model = model
    llm = build_llm(args)
    engine = AsyncEngine(llm.engine)
    config = ServerConfig(served_model_names=served_model_names(args, model), api_key=args.api_key,
                          max_queue=args.max_queue)
    app = create_app(engine, config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.drain_timeout, lifespan="on"))
    logger.info("serving %s as %s", model, ", ".join(config.served_model_names))
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler found at start: make that
    # one a no-op so a drained server exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        engine.shutdown()
    logger.info("server stopped")
    return 0


# ---- `frugal bench serve` ------------------------------------------------------------------------

# Engine options `frugal bench serve` passes on to each `frugal serve` it starts (absent ones are skipped).
_FORWARDED_ENGINE_OPTIONS = ("dtype", "device", "kv_cache_memory", "max_model_len", "block_size", "max_num_seqs",
                             "max_num_batched_tokens", "attention_backend", "quantization", "swap_space",
                             "swap_path")
_FORWARDED_REPEATED_OPTIONS = ("policy_option",)


def add_bench_serve_parser(bench_sub) -> None:
    from frugal.cli.main import add_engine_args

    bench = bench_sub.add_parser("serve", help="replay an Azure LLM trace against a `frugal serve` it starts")
    bench.add_argument("--trace", required=True, help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens")
    bench.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's request rate")
    bench.add_argument("--policy", nargs="+", default=["fcfs"],
                       help="scheduling policies to compare, one fresh server each (same requests)")
    bench.add_argument("--num-requests", type=int, default=200, help="trace rows to replay")
    bench.add_argument("--start-row", type=int, default=0, help="first trace row")
    bench.add_argument("--max-prompt-fraction", type=float, default=0.5,
                       help="scale prompt lengths so the longest fills at most this part of the context")
    bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds one policy's replay may take")
    bench.add_argument("--server-arg", action="append", default=[],
                       help="extra argument for `frugal serve` (repeatable); like the engine options below "
                            "(--policy-option, --swap-space, ...) it applies to every --policy")
    bench.add_argument("--json", action="store_true", help="print the whole result JSON to stdout")
    bench.add_argument("--out", default="benchmarks")
    bench.add_argument("--name", default=None, help="file stem (default: serve_<model>_<trace>)")
    add_engine_args(bench)
    bench.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json

    from frugal.bench import serving
    from frugal.cli.main import default_model

    if not args.rate_scale > 0:
        raise ConfigError(f"--rate-scale must be positive, got {args.rate_scale}")
    if args.num_requests < 1:
        raise ConfigError(f"--num-requests must be >= 1, got {args.num_requests}")
    if not 0 < args.max_prompt_fraction < 1:
        raise ConfigError(f"--max-prompt-fraction must be in (0, 1), got {args.max_prompt_fraction}")
    if getattr(args, "scheduling_policy", "fcfs") != "fcfs":
        raise ConfigError("frugal bench serve takes its policies from --policy NAME [NAME ...] (one server each), "
                          "not --scheduling-policy")
    model = args.model or default_model()
    engine_args = []
    for name in _FORWARDED_ENGINE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            engine_args += [f"--{name.replace('_', '-')}", str(value)]
    for name in _FORWARDED_REPEATED_OPTIONS:
        for value in getattr(args, name, None) or ():
            engine_args += [f"--{name.replace('_', '-')}", str(value)]
    if args.no_prefix_caching:
        engine_args.append("--no-prefix-caching")
    engine_args += args.server_arg
    command = invoked_command()
    result = serving.run(model, Path(args.trace), args.policy, args.rate_scale, args.num_requests, args.start_row,
                         args.max_prompt_fraction, engine_args, args.seed, args.timeout, command)
    name = args.name or f"serve_{Path(model).name}_{Path(args.trace).stem}"
    json_path, png_path = serving.write(result, Path(args.out), name)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for run in result["runs"]:
            print(f"{run['policy']}: {serving.format_summary(run['summary'])}")
    logger.info("wrote %s and %s", json_path, png_path)
    return 0
