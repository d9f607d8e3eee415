"""The `frugal` command: generate, chat (and, as later issues land, serve, bench, quantize, train).

Arguments are validated here, at the edge; user errors print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from frugal.errors import FrugalError

logger = logging.getLogger("frugal.cli")

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_model() -> str:
    """The bundled model: `models/target` in the repository; until the model zoo lands there,
    `../shared/models/stories260K` beside the repository."""
    for candidate in (REPO_ROOT / "models" / "target", REPO_ROOT.parent / "shared" / "models" / "stories260K"):
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise FrugalError("no bundled model found (models/target or ../shared/models/stories260K); pass --model DIR_OR_HUB_ID")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="checkpoint directory or Hugging Face hub id (default: the bundled model)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    group.add_argument("--kv-cache-memory", default="2GiB", help="KV cache budget, e.g. 2GiB, 512MiB or bytes")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=2048)
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "reference", "cpu"])
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the CPU decode step (less Python per token, same output; the first "
                            "decode step compiles for about a minute, cached on disk afterwards)")
    from frugal.cli import add_native_decode_option

    add_native_decode_option(group)
    group.add_argument("--quantization", default=None, choices=["none", "int4", "int8"],
                       help="weight-only quantization applied while loading (default: none, or the checkpoint's own)")
    from frugal.cli.quantize import add_quant_activations_option

    add_quant_activations_option(group)
    group.add_argument("--speculative", default=None, metavar="SPEC",
                       help="lossless speculative decoding: 'ngram:n=3,k=5' (prompt lookup) or 'draft:DIR,k=5' "
                            "(a draft model sharing the vocabulary); option adaptive=off keeps k fixed; 'medusa:DIR,nodes=12' "
                            "(heads from `frugal train medusa`; typical=on is a lossy option); "
                            "'tree:DIR,k=5,nodes=6,width=2' (LLMCad token tree from a draft model; overlap=1 drafts "
                            "during verification)")
    from frugal.cli.policy_args import add_scheduling_args

    add_scheduling_args(parser)


def build_llm(args: argparse.Namespace):
    from frugal.cli.policy_args import scheduling_kwargs
    from frugal.engine.llm import LLM

    return LLM(
        model=args.model or default_model(),
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        quantization=getattr(args, "quantization", None),
        speculative=getattr(args, "speculative", None),
        compile=getattr(args, "compile", False),
        native_decode=getattr(args, "native_decode", True),
        quant_activations=getattr(args, "quant_activations", "int8"),
        **scheduling_kwargs(args),
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def build_sampling_params(llm, args: argparse.Namespace):
    overrides = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos or None,
    }
    return llm.get_default_sampling_params().clone(**{k: v for k, v in overrides.items() if v is not None})


def cmd_generate(args: argparse.Namespace) -> int:
    llm = build_llm(args)
    params = build_sampling_params(llm, args)
    if args.json:
        output = llm.generate([args.prompt], params)[0]
        completion = output.outputs[0]
        print(json.dumps({
            "prompt": args.prompt,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "prompt_token_ids": output.prompt_token_ids,
            "finish_reason": completion.finish_reason,
            "metrics": output.metrics.as_dict(),
        }))
        return 0
    metrics = None
    for delta in llm.stream(args.prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        metrics = delta.metrics
    sys.stdout.write("\n")
    if metrics is not None:
        logger.info("ttft %.3fs, prefill %s tok/s, decode %s tok/s", metrics.time_to_first_token or 0.0,
                    _fmt(metrics.prefill_tokens_per_s), _fmt(metrics.decode_tokens_per_s))
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def cmd_chat(args: argparse.Namespace) -> int:
    llm = build_llm(args)
    if not llm.tokenizer.chat_template:
        raise FrugalError(f"model {args.model or default_model()} has no chat template; use `frugal generate`")
    params = build_sampling_params(llm, args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    print("frugal chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = llm.apply_chat_template(messages)
        reply = []
        for delta in llm.stream(prompt, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            reply.append(delta.text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugal", description="Fast LLM inference on the hardware you have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token ids, finish reason, timings")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (needs a chat template)")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    from frugal.cli.bench import add_bench_parser

    add_bench_parser(sub)

    from frugal.cli.eval import add_eval_parser
    from frugal.cli.quantize import add_quantize_parser

    add_quantize_parser(sub)
    add_eval_parser(sub)

    from frugal.cli.serve import add_serve_parser

    add_serve_parser(sub)

    from frugal.cli.train import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("frugal.cli").setLevel(logging.INFO)
    try:
        return args.func(args)
    except FrugalError as exc:
        print(f"frugal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
