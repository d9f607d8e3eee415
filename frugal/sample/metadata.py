"""SamplingMetadata: one step's per-row sampling settings as batched tensors, built once per step.

Row i of the logits belongs to a request with SamplingParams `params[i]`. Everything the Sampler
needs is here (never the Request itself): per-row temperature / top-k / top-p / min-p tensors,
penalty tensors with the token ids they apply to, the rows whose EOS is still forbidden
(min_tokens), per-row `torch.Generator`s and the number of logprobs each row wants.

Fast-path flags are computed here so the sampler does no work for features no row uses: an
all-greedy batch without penalties is a single argmax.

Reproducibility contract: a seeded request owns one `torch.Generator`, created once from its seed by
the caller (`make_generator`) and kept in a request_id -> generator dict across steps. The sampler
draws that row's noise from it alone, so the tokens depend only on the seed and the logits, never on
the other rows in the batch. Unseeded random rows use torch's global generator.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from frugal.request import Request
from frugal.sampling_params import SamplingParams

_PAD_ID = -1  # padding in the token-id tensors; the sampler maps it to a scratch column


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator a seeded request keeps for its whole life (create once, reuse every step)."""
    return torch.Generator(device=device).manual_seed(seed)


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), _PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


@dataclass
class SamplingMetadata:
    num_rows: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None          # [N] bool, None when all rows agree
    temperature: torch.Tensor | None          # [N] float32 (1.0 on greedy rows); None if all greedy
    top_k: torch.Tensor | None                # [N] int64, 0 = off; None if no row uses it
    top_p: torch.Tensor | None                # [N] float32, 1.0 = off
    min_p: torch.Tensor | None                # [N] float32, 0.0 = off
    no_penalties: bool
    repetition_penalty: torch.Tensor | None   # [N] float32
    presence_penalty: torch.Tensor | None     # [N] float32
    frequency_penalty: torch.Tensor | None    # [N] float32
    prompt_token_ids: torch.Tensor | None     # [N, max_prompt_len] int64, -1 padded (repetition only)
    output_token_ids: torch.Tensor | None     # [N, max_output_len] int64, -1 padded
    # (row, token id) pairs to forbid this step: EOS / stop ids while len(output) < min_tokens.
    banned_rows: torch.Tensor | None          # [num_banned] int64
    banned_token_ids: torch.Tensor | None     # [num_banned] int64
    generators: dict[int, torch.Generator]    # row -> the request's generator (seeded rows)
    num_logprobs: list[int | None]            # per row: params.logprobs
    max_num_logprobs: int | None              # None when no row wants logprobs

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None] | None = None,
        eos_token_ids: Sequence[Collection[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> "SamplingMetadata":
        """Metadata for N rows. `generators[i]` is row i's request generator (None: unseeded);
        `eos_token_ids[i]` are the ids forbidden while row i has fewer than min_tokens outputs
        (params.stop_token_ids are always added)."""
        device = torch.device(device)
        n = len(params)
        assert len(prompt_token_ids) == n and len(output_token_ids) == n
        generators = list(generators) if generators is not None else [None] * n
        assert len(generators) == n

        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        def col(values: list[float], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = top_k = top_p = min_p = None
        if not all_greedy:
            temperature = col([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32)
            # Truncation only matters on random rows; greedy rows keep the neutral value.
            if any(p.top_k > 0 and not g for p, g in zip(params, greedy)):
                top_k = col([0 if g else p.top_k for p, g in zip(params, greedy)], torch.long)
            if any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)):
                top_p = col([1.0 if g else p.top_p for p, g in zip(params, greedy)], torch.float32)
            if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
                min_p = col([0.0 if g else p.min_p for p, g in zip(params, greedy)], torch.float32)

        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        no_penalties = not (use_rep or use_pres or use_freq)

        banned_pairs = [
            (row, tid)
            for row, p in enumerate(params)
            if len(output_token_ids[row]) < p.min_tokens
            for tid in sorted(set(p.stop_token_ids) | set(eos_token_ids[row] if eos_token_ids else ()))
        ]

        max_num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        return cls(
            num_rows=n,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if (all_greedy or all_random) else col(greedy, torch.bool),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            no_penalties=no_penalties,
            repetition_penalty=(
                col([p.repetition_penalty for p in params], torch.float32) if use_rep else None),
            presence_penalty=col([p.presence_penalty for p in params], torch.float32) if use_pres else None,
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32) if use_freq else None,
            prompt_token_ids=_pad(prompt_token_ids, device) if use_rep else None,
            output_token_ids=None if no_penalties else _pad(output_token_ids, device),
            banned_rows=col([r for r, _ in banned_pairs], torch.long) if banned_pairs else None,
            banned_token_ids=col([t for _, t in banned_pairs], torch.long) if banned_pairs else None,
            generators={i: g for i, g in enumerate(generators) if g is not None and not greedy[i]},
            num_logprobs=[p.logprobs for p in params],
            max_num_logprobs=max_num_logprobs,
        )

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[Request],
        generators: Mapping[str, torch.Generator] | None = None,
        device: torch.device | str = "cpu",
    ) -> "SamplingMetadata":
        """One row per request, in order; `generators` maps request_id -> its generator."""
        generators = generators or {}
        return cls.build(
            [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            generators=[generators.get(r.request_id) for r in requests],
            eos_token_ids=[() if r.sampling_params.ignore_eos else r.eos_token_ids for r in requests],
            device=device,
        )
