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
    hidden_state_observer = None

    def after_step(self, scheduler_output: SchedulerOutput, running: list[Request]) -> None:
        return None

    def stats_of(self, request_id: str) -> SpecStats | None:
        return None


def build_spec_decoder(config: SpecConfig | None, *, target_arch: ArchConfig, dtype: torch.dtype,
                       device: torch.device, block_size: int, num_blocks: int, max_num_seqs: int,
                       max_model_len: int, attention_backend: str = "auto",
                       target_model: torch.nn.Module | None = None) -> SpecDecoder | NoSpeculation:
    """`target_model`: the engine's target (Medusa heads share its LM head; other methods ignore it)."""
    if config is None:
        return NoSpeculation()
    k = config.num_speculative_tokens
    if config.method == "ngram":
        proposer = NgramProposer(config.ngram_max, config.ngram_min, k)
        return SpecDecoder(proposer, k, adaptive=config.adaptive, verify_cost=VERIFY_COST_PER_TOKEN)
    if config.method == "medusa":
        return _medusa_decoder(config, target_arch, target_model, dtype, device)
    draft_dir = resolve_model_path(config.model)
    draft_arch = load_arch_config(draft_dir)
    if draft_arch.vocab_size != target_arch.vocab_size:
        raise ConfigError(f"draft model {draft_dir} has vocab_size {draft_arch.vocab_size}, the target "
                          f"{target_arch.vocab_size}; a draft must share the target's vocabulary")
    # A tree draft also prefetches the next round: its positions reach a whole tree further.
    max_position = max_model_len + (2 * k + 2 if config.method == "tree" else k)
    if draft_arch.max_position_embeddings and draft_arch.max_position_embeddings < max_model_len:
        logger.warning("draft max_position_embeddings %d < max_model_len %d", draft_arch.max_position_embeddings,
                       max_model_len)
    model = load_model(draft_dir, draft_arch, dtype, device, attention_backend, max_position=max_position,
                       progress=False)
    if config.method == "tree":
        return _tree_decoder(config, model, draft_arch, dtype, device, block_size * num_blocks, max_num_seqs)
    # Every seat at full length plus its k - 1 candidate positions.
    draft_blocks = num_blocks + max_num_seqs * (-(-k // block_size) + 1)
    kv_caches = allocate_kv_caches(draft_arch, draft_blocks, block_size, dtype, device)
    proposer = DraftModelProposer(model, kv_caches, draft_blocks, block_size, device, k)
    logger.info("speculative decoding: draft %s (%s, %d layers), k=%d", draft_dir, draft_arch.architecture,
                draft_arch.num_hidden_layers, k)
    return SpecDecoder(proposer, k, adaptive=config.adaptive, verify_cost=VERIFY_COST_PER_TOKEN,
                       draft_cost=DRAFT_COST_PER_TOKEN)


def _tree_decoder(config: SpecConfig, model: torch.nn.Module, draft_arch: ArchConfig, dtype: torch.dtype,
                  device: torch.device, num_target_slots: int, max_num_seqs: int) -> SpecDecoder:
    """LLMCad token tree (spec/tree_draft.py): one-token draft KV blocks, as many as the target's
    slots plus, per seat, a tree and a prefetched tree (and their roots)."""
    from frugal.spec.tree_draft import TreeDraftProposer
    from frugal.spec.uncertainty import AdaptiveThreshold, TreeShape

    shape = TreeShape(max_depth=config.num_speculative_tokens, max_nodes=config.tree_nodes,
                      width=config.tree_width, branch=config.tree_branch)
    num_slots = num_target_slots + max_num_seqs * (2 * shape.max_nodes + 4)
    kv_caches = allocate_kv_caches(draft_arch, num_slots, 1, dtype, device)
    threshold = AdaptiveThreshold(config.tree_threshold, enabled=config.adaptive)
    proposer = TreeDraftProposer(model, kv_caches, num_slots, device, shape, threshold, overlap=config.tree_overlap)
    logger.info("speculative decoding: token tree from draft %s, depth <= %d, <= %d nodes, width %d, overlap %s",
                config.model, shape.max_depth, shape.max_nodes, shape.width, config.tree_overlap)
    # The tree's own threshold adapts its size; the decoder's chain-length policy stays off.
    return SpecDecoder(proposer, shape.max_nodes, adaptive=False, verify_cost=VERIFY_COST_PER_TOKEN,
                       draft_cost=DRAFT_COST_PER_TOKEN)


def _medusa_decoder(config: SpecConfig, target_arch: ArchConfig, target_model: torch.nn.Module | None,
                    dtype: torch.dtype, device: torch.device) -> SpecDecoder:
    """Medusa heads (spec/medusa.py) on the target's hidden states, a fixed sparse tree of
    `tree_nodes` candidates at most min(k, heads) deep (spec/medusa_tree.py)."""
    from frugal.spec.medusa import check_base_identity, load_medusa
    from frugal.spec.medusa_proposer import MedusaProposer
    from frugal.spec.medusa_tree import build_tree
    from frugal.spec.typical import TypicalSpecDecoder

    if target_model is None:
        raise ConfigError("speculative 'medusa' needs the target model (build_spec_decoder(target_model=...))")
    heads = load_medusa(config.model, hidden_size=target_arch.hidden_size, vocab_size=target_arch.vocab_size,
                        device=device)

    def base_lm_head(hidden: torch.Tensor) -> torch.Tensor:  # [n, H] float32 -> [n, V]
        return target_model.compute_logits(hidden.to(dtype))

    check_base_identity(heads.config, base_lm_head, torch.float32, device, str(config.model))
    depth = min(config.num_speculative_tokens, heads.num_heads)
    tree = build_tree(heads.config.rank_accuracy, config.tree_nodes, depth, config.medusa_top_k)
    proposer = MedusaProposer(heads, base_lm_head, tree)
    logger.info("speculative decoding: %d Medusa heads from %s, tree of %d nodes, depth %d, top-%d, "
                "expected %.2f accepted per step%s", heads.num_heads, config.model, tree.num_nodes, tree.depth,
                tree.max_rank, tree.expected_accepted(), ", typical acceptance (lossy)" if config.typical else "")
    # A fixed tree: the decoder's chain-length policy stays off.
    if config.typical:
        return TypicalSpecDecoder(proposer, tree.num_nodes, adaptive=False, verify_cost=VERIFY_COST_PER_TOKEN,
                                  epsilon=config.typical_epsilon, delta=config.typical_delta)
    return SpecDecoder(proposer, tree.num_nodes, adaptive=False, verify_cost=VERIFY_COST_PER_TOKEN)
