"""ModelRunner: SchedulerOutput -> tensors -> model -> sampler -> RunnerOutput.

Owns the model, its paged KV cache tensors and the per-request random generators (one per seeded
request, created on first sight and dropped when the scheduler reports the request finished), so a
seeded request samples the same tokens whatever else shares its batch.

Speculative steps: `verifier` (SpecDecoder.verify) turns a request's 1 + n logits rows into the
accepted tokens and tree nodes. For a token tree whose accepted path a_1..a_m is not nodes 1..m, the
runner then copies each layer's K/V from the slot of position root + a_j to that of root + j before
the step ends, so the KV cache holds the accepted path contiguously (RoPE was applied at
root + depth = root + j, so the moved keys are exact) and the scheduler's rollback to root + m
computed positions is correct. `hidden_state_observer`, when set, receives each sampled request's
final hidden state at the row that produced its newest token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from frugal.core.scheduler_output import RunnerOutput, SchedulerOutput
from frugal.runner.input_builder import ModelInput, build_model_input
from frugal.runner.swap import KVSwapper
from frugal.sample.metadata import SamplingMetadata
from frugal.sample.sampler import Sampler

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 swapper: KVSwapper | None = None, verifier=None,
                 hidden_state_observer: Callable[[str, torch.Tensor], None] | None = None,
                 model_forward: Callable[..., torch.Tensor] | None = None):
        self.model = model
        # What runs the forward pass: the model, or a wrapper with the model's call signature
        # (runner/compiled_decode.CompiledDecode: torch.compile'd decode-only steps).
        self.model_forward = model_forward if model_forward is not None else model
        # ... and computes logits (runner/native_decode.NativeDecode has its own, else the model's).
        self.compute_logits = getattr(self.model_forward, "compute_logits", model.compute_logits)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # Copies the step's KV swap lists between the KV pool and the slow tier (none: no swap space).
        self.swapper = swapper if swapper is not None else KVSwapper(kv_caches, 0)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}
        # Checks speculative candidates (frugal.spec.decoder.SpecDecoder.verify); None: no speculation.
        self.verifier = verifier
        # Called with (request_id, hidden [hidden_size]) per sampled request; None: hidden states unused.
        self.hidden_state_observer = hidden_state_observer
        self.num_kv_slots_moved = 0  # tree K/V compaction: slots copied so far (all layers count once)

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[request_id] = generator
        return generator

    def forward_logits(self, model_input: ModelInput) -> torch.Tensor | None:
        """Run the model over the flat batch; logits [num_logits_rows, vocab] float32, or None when no
        request samples this step (pure prefill chunks)."""
        return self.forward_hidden_and_logits(model_input)[1]

    def forward_hidden_and_logits(self, model_input: ModelInput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (final hidden states of the logits rows [num_logits_rows, hidden], their logits
        [num_logits_rows, vocab] float32), both None when no request samples this step."""
        hidden_states = self.model_forward(model_input.input_ids, model_input.positions, self.kv_caches,
                                           model_input.attn_metadata)  # [num_tokens, hidden]
        if not model_input.sample_groups:
            return None, None
        hidden_rows = hidden_states[model_input.logits_indices]  # [rows, hidden]
        return hidden_rows, self.compute_logits(hidden_rows)  # [rows, vocab]

    def _compact_tree_kv(self, moves: list[tuple[int, int]]) -> None:
        """Copy every layer's K/V from slot src to slot dst for each (src, dst) (one gather and one
        scatter per layer; the gather reads all sources before any destination is written)."""
        src = torch.tensor([m[0] for m in moves], dtype=torch.int64, device=self.device)
        dst = torch.tensor([m[1] for m in moves], dtype=torch.int64, device=self.device)
        for kv_cache in self.kv_caches:
            flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # [2, num_blocks * block_size, Hkv, D]
            flat[:, dst] = flat[:, src]
        self.num_kv_slots_moved += len(moves)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self._generators.pop(request_id, None)
        self.swapper.apply(scheduler_output)  # before the forward pass writes or reads any KV
        # A preempted request keeps its output tokens and its generator: recompute rebuilds only the
        # KV cache, so its next sample continues the same random stream as if never preempted.
        if scheduler_output.is_empty:
            return RunnerOutput()
        model_input = build_model_input(scheduler_output, self.block_size, self.device)
        hidden_rows, logits = self.forward_hidden_and_logits(model_input)
        if logits is None:
            return RunnerOutput()

        output = RunnerOutput()
        observer = self.hidden_state_observer
        # Speculative steps: the verifier turns each request's 1 + k logits rows into accepted tokens.
        plain_groups = [group for group in model_input.sample_groups if group[2] == 1]
        moves: list[tuple[int, int]] = []  # tree K/V compaction (src slot, dst slot)
        for sched, first_row, num_rows in model_input.sample_groups:
            if num_rows > 1:
                assert self.verifier is not None, f"{sched.request_id}: speculative rows need a verifier"
                request = sched.request
                generator = self._generator_for(request.request_id, request.sampling_params.seed)
                result = self.verifier(request, sched.spec_token_ids, logits[first_row:first_row + num_rows],
                                       generator, parent_ids=sched.spec_parent_ids)
                output.sampled_token_ids[request.request_id] = result.token_ids
                if sched.spec_parent_ids is not None:
                    root = sched.start_pos + sched.num_new_tokens - num_rows  # position of the root
                    moves.extend((self._slot(sched.block_ids, root + node), self._slot(sched.block_ids, root + j))
                                 for j, node in enumerate(result.accepted_nodes, start=1) if node != j)
                if observer is not None:
                    last = result.accepted_nodes[-1] if result.accepted_nodes else 0
                    observer(request.request_id, hidden_rows[first_row + last].clone())
            elif observer is not None:
                observer(sched.request_id, hidden_rows[first_row].clone())
        if moves:
            self._compact_tree_kv(moves)
        if not plain_groups:
            return output
        if len(plain_groups) < len(model_input.sample_groups):
            logits = logits[[first_row for _, first_row, _ in plain_groups]]
        # Plain decoding: one logits row per sampling request.
        requests = [sched.request for sched, _, _ in plain_groups]
        generators = {r.request_id: g for r in requests
                      if (g := self._generator_for(r.request_id, r.sampling_params.seed)) is not None}
        metadata = SamplingMetadata.from_requests(requests, generators, device=logits.device)
        sampled = self.sampler(logits, metadata)
        for i, request in enumerate(requests):
            output.sampled_token_ids[request.request_id] = [sampled.token_ids[i]]
            if sampled.logprobs is not None and request.sampling_params.logprobs is not None:
                output.logprobs[request.request_id] = [sampled.logprobs[i]]
        return output
