"""`frugal train ...`: tokenizer, lm (the decoder trainer) and eval (model-card numbers)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("frugal.cli")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a tokenizer or a model; evaluate a trained model")
    train_sub = train.add_subparsers(dest="train_command", required=True)

    tok = train_sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (tokenizer.json + config)")
    tok.add_argument("--data", nargs="+", required=True, help="text files, directories or globs")
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--out", required=True, help="output directory")
    tok.set_defaults(func=cmd_tokenizer)

    lm = train_sub.add_parser("lm", help="train a decoder and save a Hugging Face checkpoint")
    lm.add_argument("--config", required=True, help="TOML with [model], [data], [optim] (see models/recipes/)")
    lm.add_argument("--data", nargs="+", default=None, help="training files (replace the config's data.files)")
    lm.add_argument("--tokenizer", default=None, help="tokenizer directory (replaces data.tokenizer)")
    lm.add_argument("--out", required=True, help="output directory (HF checkpoint; training state in OUT/train_state)")
    lm.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    lm.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    lm.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps (changes the schedule)")
    lm.add_argument("--stop-at-step", type=int, default=None,
                    help="save and exit at this step; --resume continues the same schedule later")
    lm.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    lm.add_argument("--cache-dir", default=None, help="token cache (default ~/.cache/frugal/train_tokens)")
    lm.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    lm.set_defaults(func=cmd_lm)

    ev = train_sub.add_parser("eval", help="model-card numbers: WikiText-2 perplexity, samples, sparsity, "
                                           "expert load, agreement with a target")
    ev.add_argument("model", help="trained checkpoint directory")
    ev.add_argument("--target", default=None, help="target model: measure this (draft) model's greedy agreement")
    ev.add_argument("--wikitext-dir", default=None, help="WikiText-2 folder (default ../shared/data/wikitext2_valid_test)")
    ev.add_argument("--max-eval-tokens", type=int, default=None, help="cap the tokens of each evaluation set")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--write-card", action="store_true", help="write MODEL/README.md and MODEL/card.json")
    ev.set_defaults(func=cmd_eval)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from frugal.train.tokenizer import train_tokenizer

    logging.getLogger("frugal.train").setLevel(logging.INFO)
    out = train_tokenizer(args.data, args.vocab_size, Path(args.out), min_frequency=args.min_frequency)
    print(out)
    return 0


def cmd_lm(args: argparse.Namespace) -> int:
    from frugal.train.config import TrainConfig
    from frugal.train.lm import Trainer

    logging.getLogger("frugal.train").setLevel(logging.INFO)
    _set_threads(args.threads)
    config = TrainConfig.from_toml(args.config).with_data(args.data, args.tokenizer)
    config = config.with_optim(max_steps=args.max_steps)
    command = "frugal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    trainer = Trainer(config, Path(args.out), resume=args.resume, device=args.device,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                      progress_bar=False if args.no_progress else None, command=command)
    trainer.train(stop_at_step=args.stop_at_step)
    print(json.dumps({k: v for k, v in trainer.summary().items() if k not in ("config", "data_files")}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from frugal.train.card import evaluate_model, write_card

    logging.getLogger("frugal.train").setLevel(logging.INFO)
    _set_threads(args.threads)
    report = evaluate_model(Path(args.model), target_dir=Path(args.target) if args.target else None,
                            wikitext_dir=Path(args.wikitext_dir) if args.wikitext_dir else None,
                            max_eval_tokens=args.max_eval_tokens)
    if args.write_card:
        write_card(Path(args.model), report)
    print(json.dumps(report, indent=2))
    return 0
