"""ModelRunner: SchedulerOutput -> tensors -> model -> sampler -> RunnerOutput.

Owns the model, its paged KV cache tensors and the per-request random generators (one per seeded
request, created on first sight and dropped when the scheduler reports the request finished), so a
seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import logging

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
                 swapper: KVSwapper | None = None, verifier=None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # Copies the step's KV swap lists between the KV pool and the slow tier (none: no swap space).
        self.swapper = swapper if swapper is not None else KVSwapper(kv_caches, 0)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}
        # Checks speculative candidates (frugal.spec.decoder.SpecDecoder.verify); None: no speculation.
        self.verifier = verifier

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
        hidden_states = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                                   model_input.attn_metadata)  # [num_tokens, hidden]
        if not model_input.sample_groups:
            return None
        return self.model.compute_logits(hidden_states[model_input.logits_indices])  # [rows, vocab]

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
        logits = self.forward_logits(model_input)
        if logits is None:
            return RunnerOutput()

        output = RunnerOutput()
        # Speculative steps: the verifier turns each request's 1 + k logits rows into accepted tokens.
        plain_groups = [group for group in model_input.sample_groups if group[2] == 1]
        for sched, first_row, num_rows in model_input.sample_groups:
            if num_rows > 1:
                assert self.verifier is not None, f"{sched.request_id}: speculative rows need a verifier"
                request = sched.request
                generator = self._generator_for(request.request_id, request.sampling_params.seed)
                output.sampled_token_ids[request.request_id] = self.verifier(
                    request, sched.spec_token_ids, logits[first_row:first_row + num_rows], generator)
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
