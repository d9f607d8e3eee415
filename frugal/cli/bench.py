"""`frugal bench ...`: speed measurements written to benchmarks/ as JSON + PNG with the command."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from frugal.cli import invoked_command

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

    spec = bench_sub.add_parser("spec", help="speculative decoding speedup vs plain decoding (same run)")
    spec.add_argument("model")
    spec.add_argument("--speculative", action="append", required=True, metavar="SPEC",
                      help="method to compare with plain decoding (repeatable), e.g. ngram:n=3,k=5, draft:DIR,k=4 or medusa:DIR")
    spec.add_argument("--prompts", default=str(Path(__file__).resolve().parents[3] / "shared/data/spec_bench/question.jsonl"),
                      help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl)")
    spec.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    spec.add_argument("--num-prompts", type=int, default=8)
    spec.add_argument("--prompt-tokens", type=int, default=128, help="cut each prompt to this many tokens")
    spec.add_argument("--max-tokens", type=int, default=64)
    spec.add_argument("--repeats", type=int, default=1)
    spec.add_argument("--threads", type=int, default=2)
    spec.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    spec.add_argument("--out", default="benchmarks")
    spec.add_argument("--name", default=None, help="file stem (default: spec_<model dir name>)")
    spec.set_defaults(func=cmd_spec)

    cost = bench_sub.add_parser("spec-cost", help="time of a target pass verifying k candidates vs decoding 1")
    cost.add_argument("model")
    cost.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    cost.add_argument("--context", type=int, default=256, help="tokens already in the KV cache")
    cost.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                      help="per-token acceptance rates to turn costs into speedups")
    cost.add_argument("--repeats", type=int, default=3)
    cost.add_argument("--threads", type=int, default=2)
    cost.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    cost.add_argument("--out", default="benchmarks")
    cost.add_argument("--name", default=None, help="file stem (default: spec_cost_<model dir name>)")
    cost.set_defaults(func=cmd_spec_cost)

    from frugal.cli.bench_decode import add_decode_bench_parsers

    add_decode_bench_parsers(bench_sub)

    from frugal.cli.serve import add_bench_serve_parser

    add_bench_serve_parser(bench_sub)

    from frugal.cli.bench_policies import add_policy_bench_parsers

    add_policy_bench_parsers(bench_sub)


def cmd_make_model(args: argparse.Namespace) -> int:
    from frugal.bench.shapes import write_random_checkpoint

    path = write_random_checkpoint(args.shape, Path(args.out_dir), args.dtype)
    print(path)
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    from frugal.bench import engine_vs_hf

    command = invoked_command()
    results = engine_vs_hf.run(Path(args.model), args.dtypes, args.prompt_len, args.gen_len, args.repeats,
                               args.threads, not args.no_hf, command)
    name = args.name or f"engine_{Path(args.model).name}"
    json_path, png_path = engine_vs_hf.write(results, Path(args.out), name)
    print(json.dumps(results, indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from frugal.bench import spec

    command = invoked_command()
    results = spec.run(args.model, args.speculative, args.prompts, args.batch_sizes, args.num_prompts,
                       args.prompt_tokens, args.max_tokens, args.repeats, args.threads, args.dtype, command)
    name = args.name or f"spec_{Path(args.model).name}"
    json_path, png_path = spec.write(results, Path(args.out), name)
    print(json.dumps(results, indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_spec_cost(args: argparse.Namespace) -> int:
    from frugal.bench import spec_cost

    command = invoked_command()
    results = spec_cost.run(args.model, args.k, args.context, args.repeats, args.threads, args.dtype,
                            args.acceptance, command)
    name = args.name or f"spec_cost_{Path(args.model).name}"
    json_path, png_path = spec_cost.write(results, Path(args.out), name)
    print(json.dumps(results, indent=2))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0
