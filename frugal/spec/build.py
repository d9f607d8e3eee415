"""Build the engine's speculation hook from a SpecConfig (once, at engine construction)."""

from __future__ import annotations

import logging

import torch

from frugal.config import SpecConfig
from frugal.core.scheduler_output import SchedulerOutput
from frugal.errors import ConfigError
from frugal.model.arch_config import ArchConfig, load_arch_config
from frugal.model.loader import load_model, resolve_model_path
from frugal.request import Request
from frugal.runner.kv_cache import allocate_kv_caches
from frugal.spec.decoder import SpecDecoder, SpecStats
from frugal.spec.draft_model import DraftModelProposer
from frugal.spec.ngram import NgramProposer

logger = logging.getLogger(__name__)

# Adaptive cost model (spec/adaptive.py), in plain decode steps per candidate: the target verifying
# one more position, and a draft model proposing one (prompt lookup is free).
VERIFY_COST_PER_TOKEN = 0.1
DRAFT_COST_PER_TOKEN = 0.25


class NoSpeculation:
    """The hook of an engine without speculative decoding: every step decodes one token per request."""

    verify = None

    def after_step(self, scheduler_output: SchedulerOutput, running: list[Request]) -> None:
        return None

    def stats_of(self, request_id: str) -> SpecStats | None:
        return None


def build_spec_decoder(config: SpecConfig | None, *, target_arch: ArchConfig, dtype: torch.dtype,
                       device: torch.device, block_size: int, num_blocks: int, max_num_seqs: int,
                       max_model_len: int, attention_backend: str = "auto") -> SpecDecoder | NoSpeculation:
    if config is None:
        return NoSpeculation()
    k = config.num_speculative_tokens
    if config.method == "ngram":
        proposer = NgramProposer(config.ngram_max, config.ngram_min, k)
        return SpecDecoder(proposer, k, adaptive=config.adaptive, verify_cost=VERIFY_COST_PER_TOKEN)
    draft_dir = resolve_model_path(config.model)
    draft_arch = load_arch_config(draft_dir)
    if draft_arch.vocab_size != target_arch.vocab_size:
        raise ConfigError(f"draft model {draft_dir} has vocab_size {draft_arch.vocab_size}, the target "
                          f"{target_arch.vocab_size}; a draft must share the target's vocabulary")
    max_position = max_model_len + k
    if draft_arch.max_position_embeddings and draft_arch.max_position_embeddings < max_model_len:
        logger.warning("draft max_position_embeddings %d < max_model_len %d", draft_arch.max_position_embeddings,
                       max_model_len)
    model = load_model(draft_dir, draft_arch, dtype, device, attention_backend, max_position=max_position,
                       progress=False)
    # Every seat at full length plus its k - 1 candidate positions.
    draft_blocks = num_blocks + max_num_seqs * (-(-k // block_size) + 1)
    kv_caches = allocate_kv_caches(draft_arch, draft_blocks, block_size, dtype, device)
    proposer = DraftModelProposer(model, kv_caches, draft_blocks, block_size, device, k)
    logger.info("speculative decoding: draft %s (%s, %d layers), k=%d", draft_dir, draft_arch.architecture,
                draft_arch.num_hidden_layers, k)
    return SpecDecoder(proposer, k, adaptive=config.adaptive, verify_cost=VERIFY_COST_PER_TOKEN,
                       draft_cost=DRAFT_COST_PER_TOKEN)
