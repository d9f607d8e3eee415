"""`frugal bench decode|prefill MODEL [--quantization] [--json]`, `frugal bench peers MODEL` and
`frugal bench quality MODEL` (perplexity of every quantization configuration)."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from frugal.cli import add_native_decode_option, invoked_command
from frugal.cli.quantize import add_quant_activations_option, add_quant_options, quant_config_from_args

logger = logging.getLogger("frugal.cli")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (16-bit, or written by `frugal quantize`)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks", help="directory for the JSON + PNG")
    parser.add_argument("--name", default=None, help="file stem (default: <kind>_<model dir name>)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def add_decode_bench_parsers(bench_sub) -> None:
    for kind, text in (("decode", "batch-1 decode tokens/s, peak RSS, roofline fraction"),
                       ("prefill", "prompt tokens/s (one prompt, one step), peak RSS")):
        parser = bench_sub.add_parser(kind, help=text)
        _common(parser)
        parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16"])
        parser.add_argument("--profile", action="store_true",
                            help="instead: split a decode step's time into kernels / attention / other ops / rest")
        parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                            help="torch.compile the decode step (the warm-up run compiles it)")
        add_native_decode_option(parser)
        add_quant_options(parser, with_bits=False)
        add_quant_activations_option(parser)
        parser.set_defaults(func=cmd_decode, bench_kind=kind)

    peers = bench_sub.add_parser("peers", help="frugal vs llama.cpp (llama-cpp-python) vs HF transformers")
    _common(peers)
    peers.add_argument("--frugal", nargs="+", default=["bf16", "int8", "int4", "int4-exact", "int4-eager"],
                       help="frugal configurations: bf16, int8, int4 (INT8-rounded activations, VNNI; decode steps "
                            "native, one C++ call); suffix -exact keeps activations in bf16, -eager runs decode steps "
                            "in Python (no native step), -compile torch.compiles them (e.g. int4-exact)")
    peers.add_argument("--llama-cpp", nargs="*", default=["BF16", "Q8_0", "Q4_0"],
                       help="llama.cpp GGUF types (F16, BF16, F32 converted by frugal; Q8_0, Q4_0 by llama.cpp)")
    peers.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    peers.add_argument("--no-repack", action="store_true",
                       help="run llama.cpp only with use_extra_bufts=False (no '+repack' rows)")
    peers.add_argument("--work-dir", default=None, help="where the GGUF files go (default: a temp dir, reused)")
    peers.add_argument("--no-install", action="store_true", help="fail instead of pip-installing llama-cpp-python")
    peers.set_defaults(func=cmd_peers)

    attention = bench_sub.add_parser("attention", help="the decode-attention kernel alone: AVX-512 vs AMX tiles")
    attention.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "smollm2-135m"],
                           help="named model shapes (frugal.bench.shapes)")
    attention.add_argument("--contexts", nargs="+", type=int, default=[576, 2048], help="cached positions")
    attention.add_argument("--layers", nargs="+", type=int, default=[1, 64],
                           help="caches walked per round: 1 stays in CPU caches, 64 comes from memory")
    attention.add_argument("--threads", type=int, default=2)
    attention.add_argument("--rounds", type=int, default=20)
    attention.add_argument("--out", default="benchmarks")
    attention.add_argument("--name", default="attention_decode")
    attention.set_defaults(func=cmd_attention)

    from frugal.cli.quantize import DEFAULT_CALIBRATION

    quality = bench_sub.add_parser("quality", help="perplexity of fp32/bf16/INT8/INT4 (g32, g128, rtn, gptq)")
    quality.add_argument("model", help="16-bit checkpoint directory")
    quality.add_argument("--data", default=str(DEFAULT_CALIBRATION.with_name("test.txt")),
                         help="evaluation text (default: WikiText-2 test)")
    quality.add_argument("--calib-data", default=str(DEFAULT_CALIBRATION),
                         help="GPTQ calibration text (default: WikiText-2 valid)")
    quality.add_argument("--calib-samples", type=int, default=8)
    quality.add_argument("--calib-seq-len", type=int, default=128)
    quality.add_argument("--context-len", type=int, default=None)
    quality.add_argument("--stride", type=int, default=None)
    quality.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    quality.add_argument("--threads", type=int, default=None)
    quality.add_argument("--out", default="benchmarks")
    quality.add_argument("--name", default=None, help="file stem (default: quality_<model dir name>)")
    quality.set_defaults(func=cmd_quality)



def cmd_decode(args: argparse.Namespace) -> int:
    from frugal.bench.decode import run_bench, write_results

    quant = quant_config_from_args(args)
    if args.profile:
        from frugal.bench.output import write_json_and_png
        from frugal.bench.profile_decode import plot_profile, profile_decode

        result = profile_decode(args.model, quant, args.dtype, args.prompt_len, threads=args.threads,
                                native_decode=args.native_decode)
        result["command"] = invoked_command()
        label = result["quantization"] or args.dtype
        name = args.name or f"profile_{Path(args.model).name}_{label}" + (
            "" if result["decode_path"] == "native" else f"_{result['decode_path']}")
        json_path, png_path = write_json_and_png(
            result, Path(args.out), name, lambda png: plot_profile(result, png, f"{Path(args.model).name} {label}"))
        print(json.dumps(result, indent=2))
        logger.info("wrote %s and %s", json_path, png_path)
        return 0
    results = run_bench(Path(args.model), quant, args.dtype, args.prompt_len, args.gen_len, args.repeats,
                        args.threads, invoked_command(), compile=args.compile,
                        quant_activations=args.quant_activations, native_decode=args.native_decode)
    row = results["runs"][0]
    name = args.name or f"{args.bench_kind}_{Path(args.model).name}_{row['quantization'] or row['dtype']}"
    json_path, png_path = write_results(results, Path(args.out), name, Path(args.model).name)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        key = "decode_tokens_per_s" if args.bench_kind == "decode" else "prefill_tokens_per_s"
        print(f"{args.bench_kind}: {row[key]:.2f} tokens/s ({row['quantization'] or row['dtype']}), peak RSS "
              f"{row['peak_rss_bytes'] / 2**20:.0f} MiB, {100 * row['roofline_fraction']:.0f}% of the "
              f"{results['bandwidth']['bandwidth_gb_s']:.1f} GB/s roofline")
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from frugal.bench.decode import write_results
    from frugal.bench.peers import run_peers

    model_dir = Path(args.model)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "frugal-peers"
    results = run_peers(model_dir, work_dir, args.prompt_len, args.gen_len, args.repeats, args.threads, invoked_command(),
                        args.frugal, args.llama_cpp, not args.no_hf, install=not args.no_install,
                        llama_repack=not args.no_repack)
    name = args.name or f"peers_{model_dir.name}"
    json_path, png_path = write_results(results, Path(args.out), name, f"{model_dir.name}: frugal vs peers")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results["runs"]:
            print(f"{row['label']:>22}: prefill {row['prefill_tokens_per_s']:8.1f} tok/s  decode "
                  f"{row['decode_tokens_per_s']:7.2f} tok/s  peak RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB  "
                  f"roofline {100 * row['roofline_fraction']:5.1f}%")
        for name_, ratio in results["ratios"].items():
            print(f"{name_}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from frugal.bench.attention import plot_attention, run_attention_bench
    from frugal.bench.output import write_json_and_png

    results = run_attention_bench(args.shapes, args.contexts, args.layers, args.threads, args.rounds,
                                  invoked_command())
    json_path, png_path = write_json_and_png(results, Path(args.out), args.name,
                                             lambda png: plot_attention(results, png, "paged decode attention"))
    for row in results["rows"]:
        amx = f"{row['amx_median_us']:7.1f}" if row.get("amx_median_us") else "    n/a"
        print(f"{row['shape']:>15} ctx {row['context']:5d} caches {row['layers']:3d}: AVX-512 "
              f"{row['avx512_median_us']:7.1f} us  AMX {amx} us (medians of {args.rounds})")
    logger.info("wrote %s and %s", json_path, png_path)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    import torch

    from frugal.bench.quality import run_quality, write

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    results = run_quality(args.model, Path(args.data), Path(args.calib_data), context_len=args.context_len,
                          stride=args.stride, max_tokens=args.max_tokens, calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len)
    results["command"] = invoked_command()
    json_path, png_path = write(results, Path(args.out), args.name or f"quality_{model_dir.name}",
                                f"{model_dir.name}: perplexity change vs fp32 ({Path(args.data).name})")
    for row in results["rows"]:
        print(f"{row['config']:>22}: perplexity {row['perplexity']:10.3f}  {100 * row['vs_fp32']:+6.2f}%")
    logger.info("wrote %s and %s", json_path, png_path)
    return 0
