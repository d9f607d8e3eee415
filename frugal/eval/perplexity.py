"""Perplexity of a model on a text file with a sliding window (as in Hugging Face's "Perplexity of
fixed-length models" guide): windows of `context_len` tokens advance by `stride`; each window scores
only the tokens the previous window did not, conditioned on up to `context_len - 1` tokens before them.

The model is the engine's own (same loader, dtype, quantization and kernels); each window is one
prefill through a scratch paged KV cache. Invariants: every token after the first is scored exactly
once; the result is exp(mean negative log-likelihood) over those tokens, in float64.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from frugal.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_scored_tokens: int
    num_windows: int
    context_len: int
    stride: int
    tokens_per_s: float  # tokens run through the model per second (windows overlap, so > scored/s)
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def window_spans(num_tokens: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """-> [(begin, end, first_scored)] covering tokens 1..num_tokens-1 exactly once. The first window is
    [0, context_len); each next one ends `stride` tokens later (at most context_len - 1, so the first token
    it scores still has context inside it) and starts context_len tokens before its end."""
    if context_len < 2 or not 1 <= stride <= context_len:
        raise ConfigError(f"need context_len >= 2 and 1 <= stride <= context_len, got {context_len}, {stride}")
    step = min(stride, context_len - 1)
    end = min(context_len, num_tokens)
    spans = [(0, end, 1)] if end > 1 else []  # token 0 has no context, so it is never scored
    while end < num_tokens:
        prev_end, end = end, min(end + step, num_tokens)
        spans.append((max(0, end - context_len), end, prev_end))
    return spans


@torch.no_grad()
def window_nll(model, token_ids: torch.Tensor, first_scored: int, kv_caches: list[torch.Tensor],
               block_size: int) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) for t in [first_scored, len) of one window (positions from 0)."""
    from frugal.quant.gptq import prefill_metadata

    seq_len = token_ids.shape[0]
    metadata = prefill_metadata(seq_len, block_size)
    hidden = model(token_ids, torch.arange(seq_len), kv_caches, metadata)  # [T, hidden]
    logits = model.compute_logits(hidden[first_scored - 1:seq_len - 1])  # [scored, vocab] float32
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    targets = token_ids[first_scored:seq_len]
    return float(-log_probs.gather(1, targets[:, None]).sum()), int(targets.shape[0])


def evaluate_perplexity(model_dir: Path | str, data_file: Path | str, quantization=None, dtype: str = "auto",
                        context_len: int | None = None, stride: int | None = None, max_tokens: int | None = None,
                        block_size: int = 16, progress: bool = True, kernel_backend: str | None = None,
                        quant_activations: str = "int8") -> PerplexityResult:
    """Perplexity of the model in `model_dir` (optionally quantized) on the text of `data_file`.
    `context_len` defaults to the model's max_position_embeddings (capped at 2048), `stride` to half of
    it; `max_tokens` evaluates only the first tokens of the file (BOS included). `quant_activations`:
    as the engine's option (frugal.config.ModelConfig), 'int8' by default like the engine."""
    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import load_model, resolve_dtype, resolve_model_path
    from frugal.model.tokenizer import load_tokenizer
    from frugal.quant.config import QuantConfig
    from frugal.runner.kv_cache import allocate_kv_caches

    data_file = Path(data_file)
    if not data_file.is_file():
        raise ConfigError(f"perplexity data {data_file} is not a file")
    model_dir = resolve_model_path(str(model_dir))
    arch = load_arch_config(model_dir)
    context_len = context_len or min(arch.max_position_embeddings, 2048)
    stride = stride or max(1, context_len // 2)
    if context_len > arch.max_position_embeddings:
        raise ConfigError(f"context_len {context_len} exceeds the model's max_position_embeddings "
                          f"{arch.max_position_embeddings}")
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")
    tokenizer = load_tokenizer(model_dir)
    token_ids = tokenizer.encode(data_file.read_text(encoding="utf-8", errors="replace"))
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    if len(token_ids) < 2:
        raise ConfigError(f"{data_file} has fewer than 2 tokens")
    torch_dtype = resolve_dtype(dtype, arch, "cpu")
    model = load_model(model_dir, arch, torch_dtype, "cpu", max_position=context_len, progress=progress,
                       quantization=QuantConfig.create(quantization), kernel_backend=kernel_backend,
                       quant_activations=quant_activations)
    kv_caches = allocate_kv_caches(arch, -(-context_len // block_size), block_size, torch_dtype, "cpu")
    ids = torch.tensor(token_ids, dtype=torch.int64)
    spans = window_spans(len(token_ids), context_len, stride)
    total_nll, num_scored, num_run = 0.0, 0, 0
    start = time.perf_counter()
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress or None):
        nll, count = window_nll(model, ids[begin:end], first - begin, kv_caches, block_size)
        total_nll += nll
        num_scored += count
        num_run += end - begin
    seconds = time.perf_counter() - start
    mean_nll = total_nll / num_scored
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, num_scored_tokens=num_scored,
                            num_windows=len(spans), context_len=context_len, stride=stride,
                            tokens_per_s=num_run / seconds if seconds > 0 else float("inf"), seconds=seconds)
