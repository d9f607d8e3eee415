"""Sampler: logits [N, V] -> one token id per row (+ raw logprobs when asked).

Order of operations (HF's warper order; each step batched with per-row values and skipped when no
row uses it):
1. raw logprobs = log_softmax(logits) (see logprobs.py) - before anything below;
2. min_tokens: EOS / stop ids of rows still short of min_tokens get -inf;
3. penalties - repetition (HF/vLLM/CTRL: over prompt + output tokens, a positive logit is divided by
   the penalty, a negative one multiplied), then OpenAI's frequency (minus penalty x count in the
   output) and presence (minus penalty if the token occurs in the output);
4. greedy rows: argmax of the penalised logits;
5. random rows: temperature, top-k (keep the k largest, ties at the k-th value kept), top-p (keep the
   smallest best-first set whose probability reaches p), min-p (keep tokens with
   p >= min_p * p_max), then one draw from softmax.

The draw uses the exponential race: argmax(probs / E) with E ~ Exponential(1) i.i.d. per token, which
selects token i with probability probs[i] (the Gumbel-max trick in another form; vLLM does the same).
A seeded row fills its E from its own generator, so its tokens never depend on the rest of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from frugal.sample.logprobs import TokenLogprobsEntry, compute_raw_logprobs, gather_logprobs
from frugal.sample.metadata import SamplingMetadata

logger = logging.getLogger(__name__)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] float32 -> argmax over V [N] int64 (the first maximum; the first NaN if any).
    On the CPU with frugal's kernels it is one single-threaded scan: ATen's argmax over a vocabulary
    opens an OpenMP region whose worker wake-up costs more than the scan itself."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[-1] > 0:
        from frugal.quant.kernels import cpu_kernels

        ops = cpu_kernels()
        if ops is not None:
            return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplerOutput:
    token_ids: list[int]                                  # [N]
    logprobs: list[TokenLogprobsEntry | None] | None      # [N] or None when no row asked
    sampled: torch.Tensor                                 # [N] int64, on the logits' device


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] occurrence counts of -1-padded ids [N, L]."""
    ids = torch.where(token_ids < 0, vocab_size, token_ids)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties (out of place)."""
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(md.output_token_ids, vocab_size)  # [N, V]
    if md.repetition_penalty is not None:
        seen = output_counts > 0
        if md.prompt_token_ids is not None:
            seen = seen | (_token_counts(md.prompt_token_ids, vocab_size) > 0)
        penalty = md.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if md.frequency_penalty is not None:
        logits = logits - md.frequency_penalty.unsqueeze(1) * output_counts
    if md.presence_penalty is not None:
        logits = logits - md.presence_penalty.unsqueeze(1) * (output_counts > 0).float()
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p sets. k = 0 and p = 1 are "off"."""
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [N, V]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
        kth_value = sorted_logits.gather(1, (k - 1).unsqueeze(1))      # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                   # probability of better tokens
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False                                           # the best token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens with probability < min_p x (the row's largest probability); min_p = 0 is "off"."""
    # p_i < min_p * p_max  <=>  logit_i < max_logit + log(min_p)   (log 0 = -inf masks nothing)
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draw per row by the exponential race; seeded rows use their own generator."""
    noise = torch.empty_like(probs)                                  # [N, V]
    if len(generators) < probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return (probs / noise.clamp_(min=_TINY)).argmax(dim=-1)


class Sampler:
    """Stateless: all per-request state (seeds, history) arrives in SamplingMetadata."""

    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        # [N, V] logits (float32 expected; others are upcast)
        assert logits.dim() == 2 and logits.shape[0] == md.num_rows, (tuple(logits.shape), md.num_rows)
        logits = logits.float()
        raw_logprobs = compute_raw_logprobs(logits) if md.max_num_logprobs is not None else None

        if md.banned_rows is not None:
            minus_inf = torch.tensor(float("-inf"), device=logits.device)
            logits = logits.index_put((md.banned_rows, md.banned_token_ids), minus_inf)
        if not md.no_penalties:
            logits = apply_penalties(logits, md)

        if md.all_greedy:
            sampled = greedy_tokens(logits)
        else:
            greedy_sampled = greedy_tokens(logits) if md.greedy_mask is not None else None
            logits = logits / md.temperature.unsqueeze(1)
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
            if md.min_p is not None:
                logits = apply_min_p(logits, md.min_p)
            sampled = random_sample(logits.softmax(dim=-1), md.generators)
            if greedy_sampled is not None:
                sampled = torch.where(md.greedy_mask, greedy_sampled, sampled)

        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, md.num_logprobs)
        return SamplerOutput(token_ids=sampled.tolist(), logprobs=logprobs, sampled=sampled)

    __call__ = forward
