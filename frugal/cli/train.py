"""`frugal train ...`: tokenizer, lm (the decoder trainer), eval (model-card numbers) and medusa
(speculative decoding heads on a frozen model)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from frugal.cli import invoked_command

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

    md = train_sub.add_parser("medusa", help="train Medusa heads on a frozen model (speculative='medusa:DIR')")
    md.add_argument("--model", required=True, help="the base model directory (Hugging Face checkpoint)")
    md.add_argument("--data", nargs="+", required=True, help="training text: files, directories or globs")
    md.add_argument("--out", default=None, help="where the heads go (default: the model directory)")
    md.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    md.add_argument("--heads", type=int, default=4, help="number of heads (tokens t+2 .. t+1+heads)")
    md.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    md.add_argument("--head-lm", action="store_true",
                    help="give each head its own vocabulary projection (Medusa-1; default: share the base LM head)")
    md.add_argument("--steps", type=int, default=300)
    md.add_argument("--batch-size", type=int, default=8)
    md.add_argument("--seq-len", type=int, default=256)
    md.add_argument("--lr", type=float, default=1e-3)
    md.add_argument("--warmup-steps", type=int, default=20)
    md.add_argument("--head-decay", type=float, default=0.8, help="head k's loss weight is DECAY**k")
    md.add_argument("--distill", choices=("soft", "hard"), default="soft",
                    help="soft: KL to the base model's shifted distribution; hard: CE to its argmax")
    md.add_argument("--eval-batches", type=int, default=16, help="held-out batches for the saved statistics")
    md.add_argument("--val-every", type=int, default=50, help="every N-th block of the token stream is held out")
    md.add_argument("--val-block-tokens", type=int, default=16384, help="block size of the held-out split")
    md.add_argument("--self-distill", type=int, default=0, metavar="N",
                    help="train on N sequences the model generates itself from training-text prefixes (Medusa-2)")
    md.add_argument("--init", default=None, help="start from heads saved in this directory")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    md.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    md.add_argument("--cache-dir", default=None, help="token cache (default ~/.cache/frugal/train_tokens)")
    md.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    md.set_defaults(func=cmd_medusa)


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
    command = invoked_command()
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


def cmd_medusa(args: argparse.Namespace) -> int:
    from frugal.train.medusa import MedusaTrainConfig, MedusaTrainer

    logging.getLogger("frugal.train").setLevel(logging.INFO)
    _set_threads(args.threads)
    config = MedusaTrainConfig(num_heads=args.heads, num_layers=args.layers, shared_lm_head=not args.head_lm,
                               steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                               min_lr=min(args.lr, 1e-4), warmup_steps=args.warmup_steps,
                               head_decay=args.head_decay, distill=args.distill, seed=args.seed,
                               eval_batches=args.eval_batches, val_every=args.val_every,
                               val_block_tokens=args.val_block_tokens, self_distill=args.self_distill,
                               init_from=args.init)
    command = invoked_command()
    trainer = MedusaTrainer(args.model, args.data, config, out_dir=args.out, tokenizer_dir=args.tokenizer,
                            device=args.device, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                            progress_bar=False if args.no_progress else None, command=command)
    summary = trainer.train()
    out = trainer.save()
    heldout = {k: v for k, v in (summary["heldout"] or {}).items() if k != "rank_accuracy"}
    shown = {k: v for k, v in summary.items() if k not in ("config", "data_files", "heldout")}
    print(json.dumps({"out": str(out), **shown, "heldout": heldout}, indent=2))
    return 0
