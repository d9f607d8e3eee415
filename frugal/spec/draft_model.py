"""Draft-model proposer (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023): a small model sharing the target's vocabulary proposes k tokens
autoregressively, batched over every request of the step, with its own paged KV cache.

The draft reuses the engine's pieces rather than a second engine: a `KVCacheManager` (prefix caching
off) owns its block tables, `build_model_input` builds its flat batches, the model is loaded by the
same loader. Per request the draft remembers which tokens its KV holds; each round it keeps the
longest prefix that matches the verified tokens (rejected candidates fall away by being overwritten),
computes the rest in one catch-up pass together with the first candidate's logits, then runs k - 1
single-token passes. Blocks are released in `finish`; none outlive their request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from frugal.core.kv_cache_manager import KVCacheManager
from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
from frugal.request import Request
from frugal.runner.input_builder import build_model_input
from frugal.spec.proposer import Proposal, Proposer
from frugal.spec.token_tree import draft_seed
from frugal.spec.verify import sampling_probs

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _DraftSequence:
    """What the draft's KV holds for one request (duck-types the Request fields the KV manager reads)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)   # tokens at positions 0 .. num_computed_tokens-1
    num_computed_tokens: int = 0
    is_finished: bool = False
    # A seeded request's draws come from its own generator, so its output does not depend on the batch.
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], num_blocks: int, block_size: int,
                 device: torch.device, k: int):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.k = k
        self.kv_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self._sequences: dict[str, _DraftSequence] = {}

    @property
    def num_used_blocks(self) -> int:
        return self.kv_manager.num_used_blocks

    def finish(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            sequence = self._sequences.pop(request_id, None)
            if sequence is not None:
                sequence.is_finished = True
                self.kv_manager.free(sequence)

    def _forward(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        """One draft pass; logits [len(scheduled), V] at each entry's last position."""
        output = SchedulerOutput(scheduled=scheduled, num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled))
        model_input = build_model_input(output, self.block_size, self.device)
        hidden = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                            model_input.attn_metadata)  # [num_tokens, hidden]
        return self.model.compute_logits(hidden[model_input.logits_indices]).float()  # [rows, V]

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        active: list[tuple[Request, _DraftSequence, int, list[int]]] = []   # request, seq, k, block ids
        for request in requests:
            k = min(self.k, num_tokens.get(request.request_id, 0))
            if k <= 0:
                continue
            known = request.all_token_ids
            sequence = self._sequences.get(request.request_id)
            if sequence is None:
                seed = request.sampling_params.seed
                # Never the request's own seed: that seeds the target's acceptance coins, and equal
                # streams would correlate each draw with its acceptance test (a biased output).
                generator = (None if seed is None
                             else torch.Generator(device=self.device).manual_seed(draft_seed(seed, 0)))
                sequence = self._sequences[request.request_id] = _DraftSequence(request.request_id, generator=generator)
            keep = min(_common_prefix(sequence.token_ids[: sequence.num_computed_tokens], known), len(known) - 1)
            sequence.num_computed_tokens = keep
            sequence.token_ids = list(known[:keep])
            # Positions up to len(known) + k - 2 get K/V (the last candidate is never fed back).
            block_ids = self.kv_manager.allocate_slots(sequence, len(known) - keep + k - 1)
            if block_ids is None:
                logger.debug("draft KV cache full; no candidates for %s this step", request.request_id)
                continue
            active.append((request, sequence, k, block_ids))
        if not active:
            return {}

        drafted: dict[str, list[int]] = {r.request_id: [] for r, _, _, _ in active}
        probs: dict[str, list[torch.Tensor]] = {r.request_id: [] for r, _, _, _ in active}
        scheduled = []
        for request, sequence, _, block_ids in active:
            start = sequence.num_computed_tokens
            tokens = request.all_token_ids[start:]
            scheduled.append(ScheduledRequest(request=sequence, start_pos=start, num_new_tokens=len(tokens),
                                              token_ids=list(tokens), block_ids=block_ids))
            sequence.token_ids.extend(tokens)
            sequence.num_computed_tokens += len(tokens)
        step_entries = active
        for step in range(max(k for _, _, k, _ in active)):
            logits = self._forward(scheduled)
            for row, (request, sequence, _, _) in enumerate(step_entries):
                token, q = self._draw(logits[row:row + 1], request, sequence.generator)
                drafted[request.request_id].append(token)
                if q is not None:
                    probs[request.request_id].append(q)
            step_entries = [entry for entry in step_entries if entry[2] > step + 1]
            scheduled = []
            for request, sequence, _, block_ids in step_entries:
                token = drafted[request.request_id][-1]
                scheduled.append(ScheduledRequest(request=sequence, start_pos=sequence.num_computed_tokens,
                                                  num_new_tokens=1, token_ids=[token], block_ids=block_ids))
                sequence.token_ids.append(token)
                sequence.num_computed_tokens += 1
            if not scheduled:
                break
        return {request_id: Proposal(tokens, torch.cat(probs[request_id]) if probs[request_id] else None)
                for request_id, tokens in drafted.items()}

    @staticmethod
    def _draw(logits: torch.Tensor, request: Request,
              generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
        """One candidate from the draft's logits [1, V]: argmax for greedy requests, else a draw from
        the request's warped distribution (returned as q [1, V] for the verifier)."""
        params = request.sampling_params
        if params.is_greedy:
            return int(logits.argmax(dim=-1)), None
        q = sampling_probs(logits, params)
        return int(torch.multinomial(q[0], 1, generator=generator)), q
