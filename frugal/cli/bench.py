"""`frugal bench ...`: speed measurements written to benchmarks/ as JSON + PNG with the command."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("frugal.cli")


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG under benchmarks/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    make = bench_sub.add_parser("make-model", help="write a random-weight checkpoint of a named shape")
    make.add_argument("shape", help="e.g. tinyllama-1.1b")
    make.add_argument("out_dir")
    make.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    make.set_defaults(func=cmd_make_model)

    engine = bench_sub.add_parser("engine", help="prefill and decode tokens/s, next to HF transformers")
    engine.add_argument("model")
    engine.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    engine.add_argument("--prompt-len", type=int, default=512)
    engine.add_argument("--gen-len", type=int, default=128)
    engine.add_argument("--repeats", type=int, default=2)
    engine.add_argument("--threads", type=int, default=2)
    engine.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    engine.add_argument("--out", default="benchmarks")
    engine.add_argument("--name", default=None, help="file stem (default: engine_<model dir name>)")
    engine.set_defaults(func=cmd_engine)


def cmd_make_model(args: argparse.Namespace) -> int:
    from frugal.bench.shapes import write_random_checkpoint

    path = write_random_checkpoint(args.shape, Path(args.out_dir), args.dtype)
    print(path)
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    from frugal.bench import engine_vs_hf

    command = "frugal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = engine_vs_hf.run(Path(args.model), args.dtypes, args.prompt_len, args.gen_len, args.repeats,
                               args.threads, not args.no_hf, command)
    name = args.name or f"engine_{Path(args.model).name}"
    json_path, png_path = engine_vs_hf.write(results, Path(args.out), name)
    print(json.dumps(results, indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0
