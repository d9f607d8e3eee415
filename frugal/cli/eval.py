"""`frugal eval perplexity MODEL --data FILE [--quantization ...]`."""

from __future__ import annotations

import argparse
import json
import logging

from frugal.cli.quantize import add_quant_activations_option, add_quant_options, quant_config_from_args

logger = logging.getLogger("frugal.cli")


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="model quality evaluations")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = eval_sub.add_parser("perplexity", help="sliding-window perplexity on a text file")
    ppl.add_argument("model", help="checkpoint directory or hub id")
    ppl.add_argument("--data", required=True, help="text file, e.g. ../shared/data/wikitext2_valid_test/test.txt")
    ppl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ppl.add_argument("--context-len", type=int, default=None, help="window (default: the model's context, <= 2048)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    ppl.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_quant_options(ppl, with_bits=False)
    add_quant_activations_option(ppl)
    ppl.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args: argparse.Namespace) -> int:
    import torch

    from frugal.eval.perplexity import evaluate_perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    quant = quant_config_from_args(args)
    result = evaluate_perplexity(args.model, args.data, quantization=quant, dtype=args.dtype,
                                 context_len=args.context_len, stride=args.stride, max_tokens=args.max_tokens,
                                 quant_activations=args.quant_activations)
    record = {"model": args.model, "data": args.data, "quantization": quant.name if quant else None,
              **result.as_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.num_scored_tokens} tokens "
              f"({result.num_windows} windows of {result.context_len}, stride {result.stride}); "
              f"{result.tokens_per_s:.1f} tokens/s")
    return 0
