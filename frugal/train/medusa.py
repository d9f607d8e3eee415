"""`frugal train medusa`: Medusa-1 heads (frugal.spec.medusa) on a frozen backbone.

The backbone (a Hugging Face checkpoint, run by `transformers` in float32 inference mode) turns a
batch of training windows into final hidden states h [B, T, H] and its own next-token log-probs
log p [B, T, V]. Head k (1..K) at position t is trained by self-distillation towards the base
model's distribution k positions later — the token the base model itself would emit at t+1+k:

    loss = sum_k decay^k * mean_t KL(p[t+k] || softmax(head_k(h[t])))      ("soft", default)
    or     sum_k decay^k * mean_t CE(head_k(h[t]), argmax p[t+k])           ("hard")

With `self_distill = N` (Medusa-2's self-distillation data) the windows are not read from the text
but from N sequences the model generated itself (frugal's engine, float32): a real `seq_len // 2`
token prefix from the training split, then `seq_len // 2 + 1` tokens of its own continuation —
greedy for even-numbered sequences, sampled at temperature 0.8 for odd ones (seeded). That is the
text the heads meet when speculating. Held-out statistics stay on real text.

Only the heads train (AdamW, linear warmup then cosine decay, gradient clipping). Batches come from
the zoo trainer's data pipeline (frugal.train.data): the same seed gives the same batches and, on
one device and thread count, the same heads. Held-out statistics (per head: KL, top-1 agreement
with the base model's argmax, agreement of each of the top ranks — the proposer builds its tree
from these) are measured on the validation split and saved in `medusa_config.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from frugal.errors import ConfigError
from frugal.spec.medusa import MedusaConfig, MedusaHeads, load_medusa, probe_tokens, read_medusa_config, save_medusa
from frugal.train.data import BatchSampler, expand_data_paths, split_train_val, tokenize_files
from frugal.train.lm import lr_at, resolve_device

logger = logging.getLogger(__name__)

RANKS_MEASURED = 8   # rank_accuracy covers each head's top-8 tokens


@dataclass(frozen=True)
class MedusaTrainConfig:
    num_heads: int = 4
    num_layers: int = 1            # residual blocks per head
    shared_lm_head: bool = True    # False: each head gets its own vocabulary projection (--head-lm)
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    head_decay: float = 0.8        # head k's loss weight: head_decay ** k
    distill: str = "soft"          # "soft": KL to the base distribution; "hard": CE to its argmax
    seed: int = 0
    log_every: int = 10
    eval_batches: int = 16         # held-out batches for the final statistics
    val_every: int = 50            # data split, as the zoo trainer's [data] table
    val_block_tokens: int = 16384
    self_distill: int = 0          # > 0: train on this many self-generated sequences (see the module docstring)
    init_from: str | None = None   # start from heads saved in this directory (same shape)

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_layers", "steps", "batch_size", "seq_len", "log_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"medusa training: {name} must be a positive integer, got {value!r}")
        if self.num_heads >= self.seq_len:
            raise ConfigError(f"medusa training: seq_len ({self.seq_len}) must exceed the number of heads")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"medusa training: min_lr must be in (0, lr={self.lr}], got {self.min_lr}")
        if not 0 < self.head_decay <= 1:
            raise ConfigError(f"medusa training: head_decay must be in (0, 1], got {self.head_decay}")
        if self.distill not in ("soft", "hard"):
            raise ConfigError(f"medusa training: distill must be 'soft' or 'hard', got {self.distill!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("medusa training: warmup_steps, weight_decay and grad_clip must be >= 0")
        if isinstance(self.self_distill, bool) or not isinstance(self.self_distill, int) or self.self_distill < 0:
            raise ConfigError(f"medusa training: self_distill must be a non-negative integer, got {self.self_distill!r}")

    def head_weights(self) -> list[float]:
        return [self.head_decay ** k for k in range(1, self.num_heads + 1)]


def load_backbone(model_dir: Path, device: torch.device):
    """The frozen float32 base model (transformers) in inference mode."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("medusa training needs `transformers`: pip install 'frugal[train]'") from exc
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a model directory (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def generate_sequences(model_dir: Path, train_tokens, num: int, seq_len: int, seed: int,
                       device: torch.device) -> torch.Tensor:
    """`num` self-generated sequences of seq_len + 1 tokens ([num, seq_len + 1]):
    a real prefix of seq_len // 2 tokens from `train_tokens` at seeded random offsets, then the
    model's own continuation (greedy for even i, temperature 0.8 for odd i; EOS ignored so every
    continuation has full length)."""
    from frugal import LLM, SamplingParams

    prefix = seq_len // 2
    new = seq_len + 1 - prefix
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    starts = torch.randint(0, len(train_tokens) - prefix, (num,), generator=generator).tolist()
    prompts = [[int(t) for t in train_tokens[s:s + prefix]] for s in starts]
    params = [SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0 if i % 2 == 0 else 0.8,
                             seed=seed * 100_003 + i) for i in range(num)]
    llm = LLM(str(model_dir), dtype="float32", device=str(device), max_num_seqs=64,
              max_model_len=seq_len + 8, kv_cache_memory="512MiB")
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    rows = [prompt + list(out.outputs[0].token_ids)[:new] for prompt, out in zip(prompts, outputs)]
    assert all(len(row) == seq_len + 1 for row in rows)
    logger.info("self-distillation: generated %d sequences (%d new tokens each) in %.0fs", num, new,
                time.perf_counter() - start)
    return torch.tensor(rows, dtype=torch.int64)  # [num, seq_len + 1]


class RowSampler:
    """Whole rows of a [N, seq_len + 1] token table; the batch of step s depends only on (seed, s)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + micro)
        windows = self.rows[torch.randint(0, len(self.rows), (self.batch_size,), generator=generator)]  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]


class MedusaTrainer:
    """Trains `config.num_heads` heads for the model in `model_dir`; `save()` writes them to `out_dir`
    (default: the model directory). Bad data, a tokenizer-less model or a mismatched vocabulary are
    ConfigErrors raised here, before any step."""

    def __init__(self, model_dir: Path | str, data: list[str], config: MedusaTrainConfig = MedusaTrainConfig(), *,
                 out_dir: Path | str | None = None, tokenizer_dir: Path | str | None = None, device: str = "auto",
                 cache_dir: Path | None = None, progress_bar: bool | None = None, command: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else self.model_dir
        self.config, self.command, self.progress_bar = config, command, progress_bar
        self.device = resolve_device(device)
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else self.model_dir
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise ConfigError(f"no tokenizer.json in {tokenizer_dir}; pass the tokenizer directory (--tokenizer)")
        files = expand_data_paths(data)
        self.data_files = [str(f) for f in files]
        self.backbone = load_backbone(self.model_dir, self.device)
        hf_config = self.backbone.config
        self.hidden_size, self.vocab_size = hf_config.hidden_size, hf_config.vocab_size
        tokens = tokenize_files(files, tokenizer_dir, cache_dir)
        if int(tokens.max()) >= self.vocab_size:
            raise ConfigError(f"token id {int(tokens.max())} in the data exceeds the model's vocabulary {self.vocab_size}")
        max_len = getattr(hf_config, "max_position_embeddings", None)
        if max_len and config.seq_len > max_len:
            raise ConfigError(f"seq_len {config.seq_len} exceeds the model's max_position_embeddings {max_len}")
        splits = split_train_val(tokens, config.val_every, config.val_block_tokens)
        self.sampler = BatchSampler(splits, config.seq_len, config.batch_size, config.seed)
        self.num_train_tokens, self.num_val_tokens = len(splits.train), len(splits.val)
        self.train_sampler: BatchSampler | RowSampler = self.sampler
        if config.self_distill:
            generated = generate_sequences(self.model_dir, splits.train, config.self_distill, config.seq_len,
                                           config.seed, self.device)
            self.train_sampler = RowSampler(generated, config.batch_size, config.seed)
            self.num_train_tokens = generated.numel()

        torch.manual_seed(config.seed)
        lm_head = self.backbone.get_output_embeddings()
        self.heads = MedusaHeads(MedusaConfig(
            num_heads=config.num_heads, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
            num_layers=config.num_layers, shared_lm_head=config.shared_lm_head,
            base_model=self._base_identity(lm_head))).to(self.device)
        if config.init_from:
            start = load_medusa(config.init_from, hidden_size=self.hidden_size, vocab_size=self.vocab_size)
            if start.config.num_heads != config.num_heads or start.config.shared_lm_head != config.shared_lm_head \
                    or start.config.num_layers != config.num_layers:
                raise ConfigError(f"--init {config.init_from}: heads of another shape ({start.config.num_heads} heads, "
                                  f"{start.config.num_layers} layers, shared LM head {start.config.shared_lm_head})")
            self.heads.load_state_dict(start.state_dict())
        elif self.heads.lm_heads is not None:
            with torch.no_grad():
                for head in self.heads.lm_heads:
                    head.weight.copy_(lm_head.weight)
        self.lm_head = lm_head
        params = list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.last_train_loss: float | None = None
        self.eval_stats: dict[str, Any] | None = None
        logger.info("medusa: %d heads (%s LM head), %.2fM trainable parameters, %d train / %d val tokens, device %s",
                    config.num_heads, "shared" if config.shared_lm_head else "own",
                    sum(p.numel() for p in params) / 1e6, self.num_train_tokens, self.num_val_tokens, self.device)

    def _base_identity(self, lm_head) -> dict[str, Any]:
        c = self.backbone.config
        return {"path": str(self.model_dir), "architecture": (c.architectures or [c.model_type])[0],
                "hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "num_hidden_layers": c.num_hidden_layers,
                "probe_top_tokens": probe_tokens(lm_head, c.hidden_size, device=self.device)}

    # ---- one batch ------------------------------------------------------------------------------

    @torch.no_grad()
    def backbone_pass(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, T] -> (final hidden states [B, T, H], base log-probs [B, T, V])."""
        hidden = self.backbone.model(input_ids=inputs, use_cache=False).last_hidden_state  # [B, T, H]
        return hidden, F.log_softmax(self.lm_head(hidden).float(), dim=-1)

    def head_loss(self, k: int, hidden: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
        """Head k (1-based): predictions at positions 0..T-1-k against the base at k..T-1."""
        logits = self.heads_logits(k, hidden[:, :-k])  # [B, T-k, V]
        logq = F.log_softmax(logits, dim=-1)
        teacher = base_logp[:, k:]  # [B, T-k, V]
        if self.config.distill == "hard":
            return F.nll_loss(logq.flatten(0, 1), teacher.argmax(dim=-1).flatten())
        return F.kl_div(logq.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")

    def heads_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        state = self.heads.blocks[k - 1](hidden)
        head = self.lm_head if self.heads.lm_heads is None else self.heads.lm_heads[k - 1]
        return head(state).float()

    def train_step(self) -> tuple[float, list[float]]:
        """One optimizer step; returns (weighted loss, per-head losses). Heads backpropagate one at a
        time (the backbone is frozen) so only one head's [B, T, V] activations are alive at once."""
        config = self.config
        lr = lr_at(self.step, config.lr, config.min_lr, config.warmup_steps, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, _ = (t.to(self.device) for t in self.train_sampler.batch(self.step, 0))
        hidden, base_logp = self.backbone_pass(inputs)
        per_head = []
        for k, weight in enumerate(config.head_weights(), start=1):
            loss = self.head_loss(k, hidden, base_logp)
            (weight * loss).backward()
            per_head.append(loss.item())
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(w * x for w, x in zip(config.head_weights(), per_head))
        return total, per_head

    # ---- the loop -------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train for `config.steps` steps, then measure on held-out text; returns the statistics."""
        config = self.config
        tokens_per_step = config.batch_size * config.seq_len
        bar = tqdm(total=config.steps, initial=self.step, desc="medusa", unit="step",
                   disable=None if self.progress_bar is None else not self.progress_bar, dynamic_ncols=True)
        window, window_steps, window_seconds = 0.0, 0, 0.0
        try:
            while self.step < config.steps:
                start = time.perf_counter()
                loss, per_head = self.train_step()
                seconds = time.perf_counter() - start
                self.step += 1
                self.tokens_seen += tokens_per_step
                self.train_seconds += seconds
                window, window_steps, window_seconds = window + loss, window_steps + 1, window_seconds + seconds
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self.last_train_loss = window / window_steps
                    tok_s = window_steps * tokens_per_step / window_seconds
                    eta = (config.steps - self.step) * window_seconds / window_steps
                    bar.set_postfix(loss=f"{self.last_train_loss:.3f}", tok_s=f"{tok_s:.0f}")
                    logger.info("step %d/%d  loss %.4f  heads %s  %.0f tok/s  eta %ds", self.step, config.steps,
                                self.last_train_loss, " ".join(f"{x:.3f}" for x in per_head), tok_s, eta)
                    window, window_steps, window_seconds = 0.0, 0, 0.0
        finally:
            bar.close()
        self.eval_stats = self.evaluate(config.eval_batches)
        return self.summary()

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        """Held-out statistics per head k: mean KL to the base k positions later, agreement of its
        rank-r token with the base's argmax there (r < 8), and top-1 accuracy on the real text."""
        K = self.config.num_heads
        agree = torch.zeros(K, RANKS_MEASURED, dtype=torch.float64)
        kl, true_hits, base_true_hits = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), 0.0
        counts = torch.zeros(K, dtype=torch.float64)
        base_count = 0
        for inputs, targets in self.sampler.val_batches(max_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            hidden, base_logp = self.backbone_pass(inputs)
            base_best = base_logp.argmax(dim=-1)  # [B, T]
            base_true_hits += float((base_best == targets).sum())
            base_count += targets.numel()
            for k in range(1, K + 1):
                logits = self.heads_logits(k, hidden[:, :-k])  # [B, T-k, V]
                logq = F.log_softmax(logits, dim=-1)
                teacher = base_logp[:, k:]
                kl[k - 1] += float((teacher.exp() * (teacher - logq)).sum())
                top = logits.topk(RANKS_MEASURED, dim=-1).indices  # [B, T-k, R]
                agree[k - 1] += (top == base_best[:, k:, None]).flatten(0, 1).sum(dim=0).double().cpu()
                true_hits[k - 1] += float((top[..., 0] == targets[:, k:]).sum())
                counts[k - 1] += top.shape[0] * top.shape[1]
        if base_count == 0:
            raise ConfigError("the validation split is shorter than one sequence; add data or lower seq_len")
        rank_accuracy = (agree / counts[:, None]).tolist()
        return {"positions": int(counts[0]),
                "kl": [round(x, 4) for x in (kl / counts).tolist()],
                "top1_agreement": [round(row[0], 4) for row in rank_accuracy],
                "top3_agreement": [round(sum(row[:3]), 4) for row in rank_accuracy],
                "top1_true": [round(x, 4) for x in (true_hits / counts).tolist()],
                "base_top1_true": round(base_true_hits / base_count, 4),
                "rank_accuracy": [[round(x, 5) for x in row] for row in rank_accuracy]}

    # ---- outputs --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "train_seconds": round(self.train_seconds, 1),
                "train_loss": None if self.last_train_loss is None else round(self.last_train_loss, 5),
                "device": str(self.device), "torch_threads": torch.get_num_threads(), "command": self.command,
                "train_tokens": self.num_train_tokens, "val_tokens": self.num_val_tokens,
                "data_files": self.data_files, "config": asdict(self.config), "heldout": self.eval_stats}

    def save(self) -> Path:
        """Write `medusa_heads.safetensors` and `medusa_config.json` into the output directory."""
        if self.eval_stats is None:
            self.eval_stats = self.evaluate(self.config.eval_batches)
        summary = self.summary()
        training = {k: v for k, v in summary.items() if k != "heldout"} | {
            "heldout": {k: v for k, v in self.eval_stats.items() if k != "rank_accuracy"}}
        if self.config.init_from:  # provenance: how the starting heads were trained
            training["init"] = read_medusa_config(self.config.init_from).training
        self.heads.config = replace(self.heads.config, rank_accuracy=self.eval_stats["rank_accuracy"],
                                    training=training)
        out = save_medusa(self.heads, self.out_dir)
        logger.info("saved %d Medusa heads to %s (held-out top-1 agreement %s)", self.config.num_heads, out,
                    self.eval_stats["top1_agreement"])
        return out
