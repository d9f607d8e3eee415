"""The language-model trainer behind `frugal train lm`.

One optimizer step = `grad_accum_steps` micro-batches (forward and backward under autocast in
`autocast_dtype`, float32 master weights), gradient clipping, AdamW (weight decay on matrices only),
with the learning rate of `lr_at(step)`: linear warmup, then cosine decay to `min_lr`.

Invariants:
- Determinism: the initial weights depend only on `optim.seed`, the batch of step s only on
  (seed, s); so two runs of one config on one device give identical weights, and a run resumed from
  the checkpoint of step s continues bit-exactly as the uninterrupted run would have.
- A training state is written every `checkpoint_every` steps, at the end, and on Ctrl-C, together
  with an exported Hugging Face checkpoint, so an interrupted run always leaves a usable model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from frugal.errors import ConfigError
from frugal.train.checkpoint import Progress, export_hf, load_state, save_state, state_path
from frugal.train.config import TrainConfig
from frugal.train.data import BatchSampler, expand_data_paths, split_train_val, tokenize_files
from frugal.train.model import build_model, count_parameters, eval_loss, training_loss
from frugal.train.tokenizer import check_tokenizer_dir

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over `warmup_steps`,
    then cosine decay reaching `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return resolved


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (embeddings, projections, experts) decay, vectors (norms) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optim = config.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=optim.lr, betas=(optim.beta1, optim.beta2), foreach=True)


class Trainer:
    """Trains `config`'s model into `out_dir`. Everything a user can get wrong (data, tokenizer,
    an existing run without --resume, a resume with another model shape) is a ConfigError raised
    here, before any training step."""

    def __init__(self, config: TrainConfig, out_dir: Path | str, *, resume: bool = False, device: str = "auto",
                 cache_dir: Path | None = None, progress_bar: bool | None = None, command: str | None = None) -> None:
        self.config, self.out_dir = config, Path(out_dir)
        self.device = resolve_device(device)
        self.command = command
        self.progress_bar = progress_bar
        if state_path(self.out_dir).is_file() and not resume:
            raise ConfigError(f"{self.out_dir} already holds a training run ({state_path(self.out_dir)}); "
                              "pass --resume to continue it or choose another --out")
        self.tokenizer_dir = check_tokenizer_dir(config.data.tokenizer)
        files = expand_data_paths(config.data.files)
        tokens = tokenize_files(files, self.tokenizer_dir, cache_dir)
        self.data_files = [str(f) for f in files]
        splits = split_train_val(tokens, config.data.val_every, config.data.val_block_tokens)
        self.sampler = BatchSampler(splits, config.data.seq_len, config.optim.batch_size, config.optim.seed)
        self.num_train_tokens, self.num_val_tokens = len(splits.train), len(splits.val)
        vocab_size = self._vocab_size()
        if int(tokens.max()) >= vocab_size:
            raise ConfigError(f"token id {int(tokens.max())} in the data exceeds the tokenizer's vocabulary {vocab_size}")
        if config.data.seq_len > config.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len ({config.data.seq_len}) exceeds model.max_position_embeddings "
                              f"({config.model.max_position_embeddings})")

        self.model = build_model(config.model, vocab_size, config.optim.seed).to(self.device)
        self.model.train()
        self.loss_fn = training_loss(config.model)
        self.optimizer = make_optimizer(self.model, config)
        self.progress = Progress()
        if resume:
            self._restore()
        self.parameters = count_parameters(self.model)
        amp_dtype = getattr(torch, config.optim.autocast_dtype)
        self.autocast = (nullcontext if amp_dtype == torch.float32 else
                         lambda: torch.autocast(self.device.type, dtype=amp_dtype))
        logger.info("%s: %.2fM parameters (%s), %d train / %d val tokens, device %s",
                    config.model.hf_architecture, self.parameters["total"] / 1e6, self.parameters,
                    self.num_train_tokens, self.num_val_tokens, self.device)

    def _vocab_size(self) -> int:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json")).get_vocab_size()

    def _restore(self) -> None:
        state = load_state(self.out_dir)
        saved_model = state["config"]["model"]
        if saved_model != asdict(self.config.model):
            raise ConfigError(f"--resume: the model in {state_path(self.out_dir)} ({saved_model}) differs from "
                              f"the config's ({asdict(self.config.model)})")
        saved_optim = state["config"]["optim"]
        changed = {k: (saved_optim[k], v) for k, v in asdict(self.config.optim).items() if saved_optim.get(k) != v}
        if changed:
            logger.warning("resuming with changed optimizer settings (old, new): %s", changed)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        logger.info("resumed from step %d (%d tokens seen)", self.progress.step, self.progress.tokens_seen)

    # ---- the loop -------------------------------------------------------------------------------

    def train(self, stop_at_step: int | None = None) -> Progress:
        """Train to `optim.max_steps`, or only to `stop_at_step` (the schedule is unchanged, so a
        later `--resume` continues the same run); the state is saved wherever training stops."""
        optim, progress = self.config.optim, self.progress
        last_step = optim.max_steps if stop_at_step is None else min(stop_at_step, optim.max_steps)
        tokens_per_step = optim.sequences_per_step * self.config.data.seq_len
        bar = tqdm(total=optim.max_steps, initial=progress.step, desc="train", unit="step",
                   disable=None if self.progress_bar is None else not self.progress_bar, dynamic_ncols=True)
        window_loss, window_steps, window_seconds = 0.0, 0, 0.0  # train steps only (no eval, no saving)
        try:
            while progress.step < last_step:
                step_start = time.perf_counter()
                loss = self.train_step(progress.step)
                step_seconds = time.perf_counter() - step_start
                progress.train_seconds += step_seconds
                window_seconds += step_seconds
                progress.step += 1
                progress.tokens_seen += tokens_per_step
                window_loss, window_steps = window_loss + loss, window_steps + 1
                bar.update(1)
                if progress.step % optim.log_every == 0 or progress.step == last_step:
                    progress.last_train_loss = window_loss / window_steps
                    record = {"step": progress.step, "train_loss": round(progress.last_train_loss, 5),
                              "lr": lr_at(progress.step - 1, optim.lr, optim.min_lr, optim.warmup_steps, optim.max_steps),
                              "tokens_seen": progress.tokens_seen,
                              "tokens_per_s": round(window_steps * tokens_per_step / window_seconds, 1)}
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    eta = (last_step - progress.step) * window_seconds / window_steps
                    logger.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s", progress.step, optim.max_steps,
                                record["train_loss"], record["lr"], record["tokens_per_s"], _hms(eta))
                    self._log(record)
                    window_loss, window_steps, window_seconds = 0.0, 0, 0.0
                if progress.step % optim.eval_every == 0 or progress.step == last_step:
                    progress.last_val_loss = self.evaluate(optim.eval_batches)
                    logger.info("step %d  val loss %.4f  (ppl %.2f)", progress.step, progress.last_val_loss,
                                math.exp(progress.last_val_loss))
                    self._log({"step": progress.step, "val_loss": round(progress.last_val_loss, 5)})
                if progress.step % optim.checkpoint_every == 0 or progress.step == last_step:
                    self.save()
        except KeyboardInterrupt:
            logger.warning("interrupted at step %d; saving a checkpoint", progress.step)
            self.save()
            raise
        finally:
            bar.close()
        return progress

    def train_step(self, step: int) -> float:
        """One optimizer step at index `step`; returns its mean micro-batch loss."""
        optim = self.config.optim
        lr = lr_at(step, optim.lr, optim.min_lr, optim.warmup_steps, optim.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(optim.grad_accum_steps):
            inputs, targets = (t.to(self.device) for t in self.sampler.batch(step, micro))
            with self.autocast():
                loss = self.loss_fn(self.model, inputs, targets)
            (loss / optim.grad_accum_steps).backward()
            total += loss.item()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / optim.grad_accum_steps

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float:
        """Mean next-token NLL on the validation split (the first `max_batches` batches, or all)."""
        self.model.eval()
        nll, count = 0.0, 0
        try:
            for inputs, targets in self.sampler.val_batches(max_batches):
                with self.autocast():
                    batch_nll, batch_count = eval_loss(self.model, inputs.to(self.device), targets.to(self.device))
                nll, count = nll + batch_nll, count + batch_count
        finally:
            self.model.train()
        if count == 0:
            raise ConfigError("the validation split is shorter than one sequence; add data or lower data.seq_len")
        return nll / count

    # ---- outputs --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        progress = self.progress
        return {
            "architecture": self.config.model.hf_architecture,
            "parameters": self.parameters,
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "torch_threads": torch.get_num_threads(),
            "command": self.command,
            "step": progress.step,
            "tokens_seen": progress.tokens_seen,
            "train_seconds": round(progress.train_seconds, 1),
            "train_loss": progress.last_train_loss,
            "val_loss": progress.last_val_loss,
            "train_tokens": self.num_train_tokens,
            "val_tokens": self.num_val_tokens,
            "data_files": self.data_files,
            "config": self.config.to_dict(),
        }

    def save(self) -> None:
        save_state(self.out_dir, self.model, self.optimizer, self.progress, self.config.to_dict())
        export_hf(self.model, self.out_dir, self.tokenizer_dir, self.config.optim.save_dtype, self.summary())

    def _log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
