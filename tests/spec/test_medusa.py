"""Medusa heads: save/load, the sparse tree, the proposer fed with real hidden states, typical
acceptance, and the engine end to end (greedy identical to plain greedy at batch 1 and 8, KV blocks
free, sampled output distributed as the target's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from frugal import LLM, SamplingParams
from frugal.config import SpecConfig
from frugal.errors import ConfigError
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.request import Request
from frugal.runner.kv_cache import allocate_kv_caches
from frugal.spec.medusa import (CONFIG_FILE, WEIGHTS_FILE, MedusaConfig, MedusaHeads, check_base_identity,
                                load_medusa, probe_tokens, save_medusa)
from frugal.spec.medusa_proposer import MedusaProposer
from frugal.spec.medusa_tree import build_tree, tree_tokens
from frugal.spec.typical import typical_thresholds, verify_tree_typical

REPO = Path(__file__).resolve().parents[2]
TARGET, TARGET_HEADS = REPO / "models" / "target", REPO / "models" / "target-medusa"
PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the", "One day, a little boy",
           "The sun was shining and the birds", "Sam had a big red ball", "Mom said", "There was a dog"]
MAX_TOKENS = 24


def random_heads(hidden_size: int, vocab_size: int, num_heads: int = 3, shared: bool = True, seed: int = 0,
                 scale: float = 0.05) -> MedusaHeads:
    """Heads with random (non-identity) residual blocks: candidates that are mostly wrong."""
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=hidden_size, vocab_size=vocab_size,
                                     shared_lm_head=shared))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return heads


@pytest.fixture(scope="module")
def random_heads_dir(stories260k, tmp_path_factory) -> Path:
    arch = load_arch_config(stories260k)
    return save_medusa(random_heads(arch.hidden_size, arch.vocab_size), tmp_path_factory.mktemp("heads"))


# ---- heads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip(tmp_path, shared):
    heads = random_heads(16, 40, shared=shared)
    lm = torch.nn.Linear(16, 40, bias=False)
    save_medusa(heads, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and json.loads((tmp_path / CONFIG_FILE).read_text())["num_heads"] == 3
    loaded = load_medusa(tmp_path, hidden_size=16, vocab_size=40)
    hidden = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, lm), heads(hidden, lm))
    assert loaded.config == heads.config
    with pytest.raises(ConfigError, match="hidden_size 16, the target 32"):
        load_medusa(tmp_path, hidden_size=32)
    with pytest.raises(ConfigError, match="no Medusa heads"):
        load_medusa(tmp_path / "nowhere")


def test_untrained_heads_start_as_the_base_lm_head():
    """Zero-initialised residual blocks are identities: every head reproduces the base logits."""
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=16, vocab_size=40, num_layers=2))
    lm = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(3, 16)
    with torch.no_grad():
        logits = heads(hidden, lm)
        assert logits.shape == (2, 3, 40)
        assert torch.allclose(logits[0], lm(hidden), atol=1e-6) and torch.allclose(logits[1], lm(hidden), atol=1e-6)


def test_base_identity_probe_detects_another_lm_head():
    config = MedusaConfig(num_heads=1, hidden_size=16, vocab_size=40,
                          base_model={"probe_top_tokens": probe_tokens(torch.nn.Linear(16, 40, bias=False), 16)})
    torch.manual_seed(1)
    other = torch.nn.Linear(16, 40, bias=False)
    assert not check_base_identity(config, other, torch.float32, "cpu", "test")


# ---- the tree ------------------------------------------------------------------------------------

def test_tree_is_best_first_and_every_prefix_is_a_tree():
    accuracy = [[0.6, 0.15, 0.08, 0.05], [0.4, 0.12, 0.06, 0.04], [0.3, 0.1, 0.05, 0.03]]
    tree = build_tree(accuracy, 16, 3, 4)
    assert tree.num_nodes == 16 and tree.depth == 3 and tree.max_rank <= 4
    assert list(tree.scores) == sorted(tree.scores, reverse=True)
    for index, (path, parent) in enumerate(zip(tree.paths, tree.parent_ids), start=1):
        assert 0 <= parent < index
        assert (parent == 0 and len(path) == 1) or tree.paths[parent - 1] == path[:-1]
        assert math.isclose(tree.scores[index - 1], math.prod(accuracy[d][r] for d, r in enumerate(path)))
    # scores 0.6, 0.24, 0.15, 0.08, then a tie at 0.072 broken toward the shorter path
    assert tree.paths[:6] == ((0,), (0, 0), (1,), (2,), (0, 1), (0, 0, 0))
    assert len(set(tree.paths)) == 16


def test_confident_heads_make_a_chain_and_the_depth_is_capped():
    tree = build_tree([[0.95, 0.01]] * 4, 3, 2, 2)
    assert tree.paths == ((0,), (0, 0), (1,)) and tree.parent_ids == (0, 1, 0)
    assert build_tree(None, 64, 2, 3).depth == 2  # prior accuracies, all 3 + 9 nodes of depth <= 2
    assert build_tree(None, 64, 2, 3).num_nodes == 12


def test_tree_tokens_read_each_heads_ranked_tokens():
    tree = build_tree([[0.5, 0.3], [0.5, 0.3]], 6, 2, 2)
    top = [[10, 11], [20, 21]]  # head 1's two best tokens, head 2's
    tokens = tree_tokens(tree, top)
    assert tokens == [top[len(p) - 1][p[-1]] for p in tree.paths]
    assert tree_tokens(tree, top, 2) == tokens[:2]


# ---- the proposer on real hidden states -----------------------------------------------------------

def target_hidden(model, arch, token_ids: list[int]) -> torch.Tensor:
    """Final hidden states [len, H] of one prefill through frugal's model (the engine's computation)."""
    block = 16
    num_blocks = -(-len(token_ids) // block)
    caches = allocate_kv_caches(arch, num_blocks, block, torch.float32, "cpu")
    metadata = AttentionMetadata(slot_mapping=torch.arange(len(token_ids)), block_tables=torch.arange(num_blocks)[None],
                                 query_start_loc=[0, len(token_ids)], query_lens=[len(token_ids)],
                                 seq_lens=[len(token_ids)], block_size=block)
    with torch.no_grad():
        return model(torch.tensor(token_ids), torch.arange(len(token_ids)), caches, metadata)


def test_proposer_tree_comes_from_the_heads_top_tokens(stories260k):
    arch = load_arch_config(stories260k)
    model = load_model(stories260k, arch, torch.float32, "cpu", "auto", progress=False)
    heads = random_heads(arch.hidden_size, arch.vocab_size, num_heads=3)
    tree = build_tree(None, 10, 3, 3)
    proposer = MedusaProposer(heads, model.compute_logits, tree)
    prompts = [[1, 403, 407, 261], [1, 365, 261, 5, 9, 300]]
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
    assert proposer.propose(requests, {"r0": 10, "r1": 10}) == {}  # no hidden state seen yet
    hidden = [target_hidden(model, arch, p)[-1] for p in prompts]  # [H] at each prompt's last position
    for request, h in zip(requests, hidden):
        proposer.observe_hidden_states(request.request_id, h)
    proposals = proposer.propose(requests, {"r0": 10, "r1": 4})
    for request, h in zip(requests, hidden):
        with torch.no_grad():
            logits = heads(h[None], model.compute_logits)[:, 0]  # [K, V]
        top = logits.topk(3, dim=-1).indices.tolist()
        n = 10 if request.request_id == "r0" else 4
        proposal = proposals[request.request_id]
        assert proposal.draft_probs is None
        assert proposal.parent_ids == list(tree.parent_ids[:n])
        assert proposal.token_ids == [top[len(p) - 1][p[-1]] for p in tree.paths[:n]]
    proposer.finish(["r0"])
    assert set(proposer.propose(requests, {"r0": 10, "r1": 10})) == {"r1"}


# ---- typical acceptance ---------------------------------------------------------------------------

def test_typical_acceptance_takes_the_longest_typical_path():
    V = 6
    probs = torch.full((5, V), 0.02)
    probs[0, 1], probs[0, 2] = 0.5, 0.4     # root: tokens 1 and 2 both typical
    probs[1, 0] = 0.88                      # after node 1 (token 1): token 0, so token 5 is atypical
    probs[2, 3] = 0.88                      # after node 2 (token 2): token 3 typical
    probs[4, 4] = 0.88
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # nodes: 1 = token 1 (root), 2 = token 2 (root), 3 = token 5 under node 1, 4 = token 3 under node 2
    result = verify_tree_typical(probs, [1, 2, 5, 3], [0, 0, 1, 2], epsilon=0.09, delta=0.3,
                                 generator=torch.Generator().manual_seed(0))
    assert result.accepted_nodes == [2, 4] and result.token_ids[:2] == [2, 3] and len(result.token_ids) == 3
    # nothing typical: one token sampled from the root distribution
    flat = torch.full((2, V), 1 / V)
    assert typical_thresholds(flat, 0.09, 0.3)[0] == pytest.approx(0.3 / V)
    peaked = torch.tensor([[0.02, 0.9, 0.02, 0.02, 0.02, 0.02]] * 2)
    result = verify_tree_typical(peaked, [0], [0], generator=torch.Generator().manual_seed(0))
    assert result.accepted_nodes == [] and len(result.token_ids) == 1


# ---- config ---------------------------------------------------------------------------------------

def test_spec_config_parses_medusa_options():
    config = SpecConfig.parse("medusa:some/dir,k=3,nodes=20,topk=5,typical=on,eps=0.2,delta=0.4")
    assert (config.method, config.model, config.num_speculative_tokens, config.tree_nodes, config.medusa_top_k,
            config.typical, config.typical_epsilon, config.typical_delta) == (
        "medusa", "some/dir", 3, 20, 5, True, 0.2, 0.4)
    assert not SpecConfig.parse("medusa:d").typical
    for bad, message in [("medusa", "needs the directory"), ("medusa:d,nodes=0", "positive"),
                         ("medusa:d,eps=2", r"\(0, 1\]"), ("ngram:typical=on", "unknown option"),
                         ("medusa:d,nodes=65", "at most 64")]:
        with pytest.raises(ConfigError, match=message):
            SpecConfig.parse(bad)


# ---- the engine -----------------------------------------------------------------------------------

def make_llm(model, speculative=None, **kwargs) -> LLM:
    return LLM(str(model), kv_cache_memory="16MiB", max_num_seqs=8, speculative=speculative, **kwargs)


@pytest.fixture(scope="module")
def plain_greedy(stories260k):
    outputs = make_llm(stories260k).generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [o.outputs[0].token_ids for o in outputs]


def assert_consistent_stats(outputs, max_depth: int) -> None:
    for output in outputs:
        stats = output.metrics.spec
        assert stats is not None and stats.num_generated_tokens == len(output.outputs[0].token_ids)
        assert stats.num_verify_steps >= 1 and stats.num_proposed_tokens >= stats.num_verify_steps
        assert 1.0 <= stats.tokens_per_target_step <= 1 + max_depth
        assert len(stats.acceptance_by_position) <= max_depth


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_with_random_heads_equals_plain_greedy(stories260k, random_heads_dir, plain_greedy, batch):
    llm = make_llm(stories260k, f"medusa:{random_heads_dir},nodes=12,topk=4")
    outputs = llm.generate(PROMPTS[:batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy[:batch]
    assert llm.engine.scheduler.num_used_blocks == 0
    assert_consistent_stats(outputs, 3)


@pytest.mark.skipif(not (TARGET_HEADS / WEIGHTS_FILE).is_file(), reason="models/target-medusa not trained")
@pytest.mark.parametrize("batch", [1, 8])
def test_trained_heads_on_the_bundled_target(batch):
    """The bundled heads on the bundled target: identical greedy output, deep accepted paths (so the
    runner compacts tree K/V), all blocks free. In float32: the checkpoint is bfloat16, and in
    bfloat16 a 13-row verify pass and a 1-row decode step round differently, so near-tied argmaxes
    can flip (an engine property, not the proposer's)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    plain = [o.outputs[0].token_ids for o in make_llm(TARGET, dtype="float32").generate(PROMPTS[:batch], params)]
    llm = make_llm(TARGET, f"medusa:{TARGET_HEADS}", dtype="float32")
    outputs = llm.generate(PROMPTS[:batch], params)
    assert [o.outputs[0].token_ids for o in outputs] == plain
    assert llm.engine.scheduler.num_used_blocks == 0
    assert_consistent_stats(outputs, 4)
    total = sum(o.metrics.spec.num_generated_tokens for o in outputs)
    steps = sum(o.metrics.spec.num_target_steps for o in outputs)
    assert total / steps > 1.2, total / steps


# ---- a model whose heads are good: deep acceptance, and the sampling distribution ------------------

@pytest.fixture(scope="module")
def memorising(tmp_path_factory):
    """(model dir, its text, heads dir): a tiny zoo-trained Llama that has nearly memorised a short
    text, and Medusa heads trained on it by `MedusaTrainer` (tests/medusa_models.py)."""
    from medusa_models import SHAKESPEARE, data_split, make_memorising_model

    from frugal.train.medusa import MedusaTrainConfig, MedusaTrainer

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("memorising")
    model_dir, text = make_memorising_model(root)
    config = MedusaTrainConfig(num_heads=3, steps=40, seq_len=64, batch_size=8, lr=1e-2, min_lr=1e-3,
                               warmup_steps=3, eval_batches=2, **data_split(model_dir))
    trainer = MedusaTrainer(model_dir, [str(text)], config, out_dir=root / "heads", cache_dir=root / "cache",
                            progress_bar=False)
    trainer.train()
    return model_dir, text.read_text(), trainer.save()


@pytest.mark.parametrize("batch, options", [(1, ""), (8, ""), (8, ",typical=on")])
def test_greedy_with_trained_heads_equals_plain_greedy(memorising, batch, options):
    """Greedy stays exact with typical acceptance switched on too (it only affects sampling)."""
    model_dir, text, heads_dir = memorising
    prompts = [text[i * 90:i * 90 + 30] for i in range(batch)]
    params = SamplingParams(max_tokens=32, temperature=0)
    plain = [o.outputs[0].token_ids for o in make_llm(model_dir).generate(prompts, params)]
    llm = make_llm(model_dir, f"medusa:{heads_dir},nodes=10{options}")
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == plain
    assert llm.engine.scheduler.num_used_blocks == 0
    assert_consistent_stats(outputs, 3)
    # The heads know the text: several tokens per target pass, accepted off the first branch too.
    total = sum(o.metrics.spec.num_generated_tokens for o in outputs)
    assert total / sum(o.metrics.spec.num_target_steps for o in outputs) > 1.5
    assert llm.engine.runner.num_kv_slots_moved > 0


def pooled_chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square of observed `counts` against `expected` counts (same total), cells with
    expectation below `min_expected` pooled into one."""
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    want = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    if want[-1] == 0:
        assert observed[-1] == 0, "a token the target never emits was emitted"
        observed, want = observed[:-1], want[:-1]
    stat = ((observed - want) ** 2 / want).sum()
    dof = len(want) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def sampling_p_values(memorising, speculative: str, num: int = 300) -> tuple[int, list[float]]:
    """Sample 4 tokens for `num` seeded requests (temperature 1, top-k 20) with `speculative`; the
    chi-square p-values of output tokens 2 and 3 against the sum of their exact conditional
    distributions given the tokens before them (frugal's model in float32), and the accepted count."""
    from frugal.model.tokenizer import load_tokenizer
    from frugal.spec.verify import sampling_probs

    model_dir, text, _ = memorising
    prompt = text[:40]
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_k=20, seed=1000 + i) for i in range(num)]
    llm = make_llm(model_dir, speculative)
    outputs = llm.generate([prompt] * num, params)
    assert llm.engine.scheduler.num_used_blocks == 0

    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None) + tokenizer.encode(
        prompt, add_special_tokens=False)
    assert outputs[0].prompt_token_ids == prompt_ids
    arch = load_arch_config(model_dir)
    model = load_model(model_dir, arch, torch.float32, "cpu", "auto", progress=False)
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def next_probs(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in cache:
            logits = model.compute_logits(target_hidden(model, arch, list(prefix))[-1:])
            cache[prefix] = sampling_probs(logits, params[0])[0]
        return cache[prefix]

    p_values = []
    for index in (1, 2):
        counts, expected = torch.zeros(arch.vocab_size), torch.zeros(arch.vocab_size, dtype=torch.float64)
        for output in outputs:
            tokens = output.outputs[0].token_ids
            counts[tokens[index]] += 1
            expected += next_probs(tuple(prompt_ids + tokens[:index])).double()
        p_values.append(pooled_chi_square_p_value(counts, expected))
    return sum(o.metrics.spec.num_accepted_tokens for o in outputs), p_values


def test_sampling_with_trained_heads_keeps_the_target_distribution(memorising):
    accepted, p_values = sampling_p_values(memorising, f"medusa:{memorising[2]},nodes=10")
    assert accepted > 300 / 4  # speculation did accept candidates
    assert min(p_values) > 1e-3, p_values


def test_typical_acceptance_is_lossy_and_the_test_above_sees_it(memorising):
    """Typical acceptance accepts more, and the same chi-square test rejects its distribution: the
    lossless test has the power to see a wrong verifier."""
    lossless, _ = sampling_p_values(memorising, f"medusa:{memorising[2]},nodes=10")
    accepted, p_values = sampling_p_values(memorising, f"medusa:{memorising[2]},nodes=10,typical=on")
    assert accepted > lossless
    assert min(p_values) < 1e-6, p_values
