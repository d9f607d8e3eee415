"""The LLMCad token-tree proposer (spec/tree_draft.py, spec/uncertainty.py): its policy on its own,
then inside the engine on the real stories260K: greedy output identical to plain greedy at batch 1
and 8 (with and without drafting during verification), draft KV all free afterwards, and sampled
tokens distributed exactly as the target's (chi-square against the target's exact distribution)."""

from __future__ import annotations

import math

import pytest
import torch

from frugal import LLM, SamplingParams
from frugal.config import SpecConfig
from frugal.errors import ConfigError
from frugal.spec.uncertainty import (AdaptiveThreshold, TreeShape, allot_children, draw_children, num_children,
                                     surprisal)
from tiny_models import load_hf, make_tiny_checkpoint

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the", "One day, a little boy",
           "The sun was shining and the birds", "Sam had a big red ball", "Mom said", "There was a dog"]
MAX_TOKENS = 24


# ---- policy ---------------------------------------------------------------------------------------

def test_uncertain_nodes_branch_and_confident_nodes_do_not():
    shape = TreeShape(width=3, branch=0.6)     # branch where the runner-up is >= 0.6 x the best token
    assert num_children(0.6, shape) == 3
    assert num_children(0.59, shape) == 1


def test_children_are_allotted_to_the_most_confident_paths_first_one_each_before_siblings():
    shape = TreeShape(width=3, branch=0.6)
    # (path confidence, runner-up ratio): node 0 is sure (1 child), nodes 1 and 2 unsure (3 each).
    frontier = [(0.9, 0.1), (0.5, 0.7), (0.7, 0.9)]
    assert allot_children(frontier, 100, shape) == [1, 3, 3]
    assert allot_children(frontier, 3, shape) == [1, 1, 1]
    assert allot_children(frontier, 4, shape) == [1, 1, 2]   # the sibling goes to the surer path
    assert allot_children(frontier, 2, shape) == [1, 0, 1]
    assert allot_children(frontier, 0, shape) == [0, 0, 0]


def test_draw_children_greedy_takes_the_top_tokens_sampling_draws_from_q():
    q = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert draw_children(q, 2, greedy=True, generator=None) == [1, 3]
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_children(q, 2, greedy=False, generator=generator) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, q, atol=0.02, rtol=0)


def test_surprisal_is_additive_uncertainty_in_nats():
    assert surprisal(1.0) == 0.0
    assert surprisal(0.25) == pytest.approx(surprisal(0.5) * 2)
    assert surprisal(0.0) == math.inf


def test_threshold_rises_when_verification_reaches_a_leaf_and_falls_on_rejections_inside():
    policy = AdaptiveThreshold(0.5, step=0.1, low=0.2, high=0.8)
    policy.observe("a", ended_on_leaf=True)
    assert policy.value("a") == pytest.approx(0.6)
    for _ in range(10):
        policy.observe("a", ended_on_leaf=True)
    assert policy.value("a") == pytest.approx(0.8)           # bounded
    for _ in range(20):
        policy.observe("b", ended_on_leaf=False)
    assert policy.value("b") == pytest.approx(0.2)
    assert policy.counts("b") == (0, 20)
    assert policy.value("c") == 0.5                          # per request
    fixed = AdaptiveThreshold(0.5, enabled=False)
    fixed.observe("a", ended_on_leaf=True)
    assert fixed.value("a") == 0.5
    policy.forget("a")
    assert policy.value("a") == 0.5


def test_spec_config_parses_tree_options():
    config = SpecConfig.parse("tree:/m/d,k=4,nodes=8,width=3,branch=0.5,threshold=0.4,overlap=1,adaptive=off")
    assert config == SpecConfig("tree", "/m/d", 4, adaptive=False, tree_nodes=8, tree_width=3, tree_branch=0.5,
                                tree_threshold=0.4, tree_overlap=True)
    assert SpecConfig.parse("tree:/m/d").tree_overlap is False
    for bad, message in [("tree", "needs a draft model"), ("tree:/m,threshold=-1", r"nats in \[0, 30\]"),
                         ("tree:/m,branch=1.5", r"in \(0, 1\)"),
                         ("tree:/m,nodes=0", "positive"), ("tree:/m,width=x", "integer"),
                         ("tree:/m,overlap=maybe", "on/off"), ("tree:/m,branch=high", "number"),
                         ("draft:/m,nodes=4", "unknown option")]:
        with pytest.raises(ConfigError, match=message):
            SpecConfig.parse(bad)


# ---- the proposer against the verifier -----------------------------------------------------------

@pytest.mark.parametrize("overlap", [0, 1])
def test_tree_nodes_are_the_draft_models_top_tokens_on_every_path(stories260k, overlap):
    """Draft = stories260K, oracle = the same checkpoint run by transformers on each node's whole
    path: every node's children are the oracle's top tokens there (so the draft's one-token-page KV
    gives each node exactly its ancestors at the right positions), and `verify_tree` with the
    oracle as target accepts the whole most confident path, round after round."""
    from frugal.model.arch_config import load_arch_config
    from frugal.request import Request
    from frugal.spec.build import build_spec_decoder
    from frugal.spec.verify import verify_tree

    config = SpecConfig.parse(f"tree:{stories260k},k=4,nodes=10,width=2,branch=0.2,threshold=30,adaptive=0,"
                              f"overlap={overlap}")
    proposer = build_spec_decoder(config, target_arch=load_arch_config(stories260k), dtype=torch.float32,
                                  device=torch.device("cpu"), block_size=16, num_blocks=32, max_num_seqs=2,
                                  max_model_len=256).proposer
    proposer.interruptible = False   # every prefetch runs to its end: hits do not depend on timing
    oracle = load_hf(stories260k)
    request = Request("r", [1, 403, 407, 290, 261], SamplingParams(temperature=0, max_tokens=64))
    for _ in range(4):
        proposal = proposer.propose([request], {"r": 10})["r"]
        tokens, parents = proposal.token_ids, proposal.parent_ids
        assert 1 <= len(tokens) <= 10 and proposal.draft_probs is None
        paths = [[]]
        for token, parent in zip(tokens, parents):
            assert 0 <= parent < len(paths)
            paths.append(paths[parent] + [token])
        assert max(len(path) for path in paths) <= 4
        with torch.no_grad():
            logits = torch.stack([oracle(torch.tensor([request.all_token_ids + path])).logits[0, -1]
                                  for path in paths])  # [n + 1, V]
        for node in range(len(paths)):
            children = [tokens[i] for i, parent in enumerate(parents) if parent == node]
            if children:
                assert children == logits[node].topk(len(children)).indices.tolist()
        result = verify_tree(logits, tokens, parents, greedy=True)
        depth, node = 0, 0
        while any(parent == node for parent in parents):   # the first child is the top-1 one
            node, depth = parents.index(node) + 1, depth + 1
        assert result.num_accepted == depth
        request.append_output_token_ids(result.token_ids)
    if overlap:
        assert proposer.num_prefetch_hits == 3 and proposer.num_prefetch_misses == 0
    proposer.finish(["r"])
    assert proposer.num_used_blocks == 0


# ---- inside the engine ----------------------------------------------------------------------------

def make_llm(model, speculative=None, **kwargs) -> LLM:
    return LLM(str(model), kv_cache_memory="16MiB", max_num_seqs=kwargs.pop("max_num_seqs", 8),
               speculative=speculative, **kwargs)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A tiny random-weight Llama with the stories tokenizer (vocab 512): a draft that is mostly wrong."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), "llama", seed=3)


@pytest.fixture(scope="module")
def plain_greedy(stories260k):
    outputs = make_llm(stories260k).generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    assert llm.engine.scheduler.num_used_blocks == 0
    assert llm.engine.spec.proposer.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [0, 1])
@pytest.mark.parametrize("draft", ["self", "random"])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_identical_to_plain_greedy(stories260k, random_draft, plain_greedy, batch, draft, overlap):
    draft_dir = stories260k if draft == "self" else random_draft
    llm = make_llm(stories260k, f"tree:{draft_dir},k=4,nodes=8,width=2,overlap={overlap}")
    llm.engine.spec.proposer.interruptible = False
    outputs = llm.generate(PROMPTS[:batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy[:batch]
    assert_all_blocks_free(llm)
    stats = [o.metrics.spec for o in outputs]
    for s, output in zip(stats, outputs):
        assert s.num_generated_tokens == len(output.outputs[0].token_ids)
        assert s.num_verify_steps > 0
        assert s.num_proposed_tokens <= 8 * s.num_verify_steps
        assert len(s.acceptance_by_position) <= 4
    proposer = llm.engine.spec.proposer
    if draft == "self":  # the target drafting for itself: the most confident path is always accepted
        assert all(s.tokens_per_target_step > 2 for s in stats)
        if overlap:  # ... so the tree drafted during verification is almost always the right one
            assert proposer.num_prefetch_hits > proposer.num_prefetch_misses
    else:
        assert all(s.tokens_per_target_step < 1.5 for s in stats)
    if not overlap:
        assert proposer.num_prefetch_hits == proposer.num_prefetch_misses == 0


def test_trees_shrink_for_a_bad_draft_and_grow_for_a_good_one(stories260k, random_draft):
    """The self-adjusting threshold: rejections inside the tree make later trees smaller."""
    params = SamplingParams(max_tokens=48, temperature=0)
    sizes = {}
    for name, draft in [("good", stories260k), ("bad", random_draft)]:
        spec = f"tree:{draft},k=6,nodes=12,width=2,threshold=2"
        stats = make_llm(stories260k, spec).generate(PROMPTS[:2], params)[0].metrics.spec
        sizes[name] = stats.num_proposed_tokens / stats.num_verify_steps
    assert sizes["bad"] < 2.0 < sizes["good"]


def test_tree_fits_a_small_step_budget(stories260k, plain_greedy):
    """8 requests, a 12-token step budget: trees are cut by the scheduler (a prefix of a tree is a tree)."""
    llm = make_llm(stories260k, f"tree:{stories260k},k=5,nodes=10,overlap=1", max_num_batched_tokens=12)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy
    assert_all_blocks_free(llm)


def test_stop_tokens_max_tokens_and_mixed_sampling(stories260k, plain_greedy):
    llm = make_llm(stories260k, f"tree:{stories260k},k=5,overlap=1")
    stop_token = plain_greedy[0][6]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[stop_token]),
              SamplingParams(max_tokens=7, temperature=0),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, seed=5),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, repetition_penalty=1.3, seed=6)]
    outputs = llm.generate(PROMPTS[:4], params)
    assert outputs[0].outputs[0].token_ids == plain_greedy[0][: plain_greedy[0].index(stop_token) + 1]
    assert outputs[1].outputs[0].token_ids == plain_greedy[1][:7]
    assert outputs[2].metrics.spec.num_accepted_tokens > 0        # sampled with speculation
    assert outputs[3].metrics.spec.num_proposed_tokens == 0       # penalties: no speculation
    assert len(outputs[2].outputs[0].token_ids) == MAX_TOKENS
    assert_all_blocks_free(llm)


@pytest.fixture(scope="module")
def noisy_draft(stories260k, tmp_path_factory):
    """stories260K with slightly perturbed weights: a good draft that is not the target itself."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("noisy_stories")
    for path in stories260k.iterdir():
        if path.is_file():
            shutil.copy(path, out / path.name)
    generator = torch.Generator().manual_seed(5)
    weights = {name: w + 0.05 * w.std() * torch.randn(w.shape, generator=generator) if w.dim() == 2 else w
               for name, w in load_file(out / "model.safetensors").items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("overlap", [0, 1])
def test_seeded_sampling_is_reproducible(stories260k, noisy_draft, overlap):
    """Each tree draws from a generator seeded by the request's seed and its root's position, so
    whether a tree was drafted during verification (thread timing) does not change the output.
    (Up to float rounding: which draft passes batch together depends on timing; a draft equal to
    the target makes acceptance ratios ~1.0, where rounding decides whether a coin is drawn.)"""
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=11),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=12)]
    spec = f"tree:{noisy_draft},k=3,width=3,branch=0.3,overlap={overlap}"
    runs = [make_llm(stories260k, spec).generate(PROMPTS[:2], params) for _ in range(2)]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]
    assert runs[0][0].metrics.spec.num_accepted_tokens > 0


# ---- sampling is lossless -------------------------------------------------------------------------

def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    total = counts.sum()
    mask = expected_probs > 0
    assert counts[~mask].sum() == 0, "a sequence the target never emits was emitted"
    expected = expected_probs[mask] * total
    stat = ((counts[mask] - expected) ** 2 / expected).sum()
    dof = int(mask.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


@pytest.fixture(scope="module")
def sampling_pair(tmp_path_factory):
    """A tiny target and a draft that is the target with twice its logits: the same top-k support,
    a sharper distribution, so candidates are accepted often but not always."""
    from safetensors.torch import load_file, save_file

    target = make_tiny_checkpoint(tmp_path_factory.mktemp("target"), "llama", seed=0)
    draft = make_tiny_checkpoint(tmp_path_factory.mktemp("sharp"), "llama", seed=0)
    weights = load_file(draft / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2.0
    save_file(weights, draft / "model.safetensors", metadata={"format": "pt"})
    return target, draft


@pytest.mark.parametrize("overlap", [0, 1])
def test_sampled_tokens_follow_the_target_distribution(sampling_pair, overlap):
    """Tokens 2 and 3 of each request come from a verified tree (token 1 comes from the prefill;
    branching everywhere, 2 i.i.d. children per node). Their joint distribution with token 1,
    top_k=3 (27 sequences), must be the target's."""
    from frugal.spec.verify import sampling_probs

    target, draft = sampling_pair
    prompt = [1, 403, 407, 290]
    base = dict(temperature=0.7, top_k=3, max_tokens=6, ignore_eos=True)
    llm = make_llm(target, f"tree:{draft},k=3,nodes=6,width=2,branch=0.01,threshold=3,overlap={overlap}",
                   max_num_seqs=64)
    trials = 1500
    outputs = llm.generate([prompt] * trials, [SamplingParams(**base, seed=1000 + i) for i in range(trials)])
    assert_all_blocks_free(llm)
    stats = [o.metrics.spec for o in outputs]
    proposed = sum(s.num_proposed_tokens for s in stats)
    accepted = sum(s.num_accepted_tokens for s in stats)
    assert 0 < accepted < proposed                       # both acceptances and rejections happen

    hf = load_hf(target)
    params = SamplingParams(**base)

    def next_probs(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + prefix])).logits[0, -1:]  # [1, V]
        return sampling_probs(logits, params)[0]

    root = next_probs([])
    support = root.nonzero().flatten().tolist()
    cells, expected = {}, []
    for x1 in support:
        second = next_probs([x1])
        for x2 in second.nonzero().flatten().tolist():
            third = next_probs([x1, x2])
            for x3 in third.nonzero().flatten().tolist():
                cells[(x1, x2, x3)] = len(expected)
                expected.append(float(root[x1] * second[x2] * third[x3]))
    counts = torch.zeros(len(expected) + 1)
    for output in outputs:
        counts[cells.get(tuple(output.outputs[0].token_ids[:3]), len(expected))] += 1
    assert counts[-1] == 0, "a sequence outside the target's top-k support was emitted"
    assert chi_square_p_value(counts[:-1], torch.tensor(expected, dtype=torch.float64)) > 1e-3


# ---- command line ---------------------------------------------------------------------------------

def test_generate_and_bench_spec_take_the_tree_flag(stories260k, tmp_path):
    import json
    import subprocess
    import sys

    def run_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "frugal.cli.main", *args], capture_output=True, text=True,
                              timeout=300)

    spec = f"tree:{stories260k},k=4,nodes=6,overlap=1"
    result = run_cli("generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "20",
                     "--temperature", "0", "--json", "--kv-cache-memory", "8MiB", "--speculative", spec)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["text"].startswith(", there was a little girl named Lily")   # stories260K's greedy text
    assert payload["metrics"]["spec"]["tokens_per_target_step"] > 2

    prompts = tmp_path / "q.jsonl"
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "x", "turns": [text]})
                                 for i, text in enumerate(["Once upon a time", "The dog ran"])) + "\n")
    result = run_cli("bench", "spec", str(stories260k), "--speculative", spec, "--prompts", str(prompts),
                     "--batch-sizes", "2", "--num-prompts", "2", "--max-tokens", "12", "--out", str(tmp_path),
                     "--name", "t")
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads((tmp_path / "t.json").read_text())["runs"] if r["method"] == spec)
    assert row["identical_to_plain"] and row["output_tokens"] == 24 and row["tokens_per_target_step"] > 1
    assert {"prefetch_hits", "prefetch_misses"} <= set(row)   # the bench reports the overlap's guesses


def test_preempted_requests_keep_greedy_output_and_free_every_block(stories260k, plain_greedy):
    """A 192-token target KV cache for 8 requests: the scheduler preempts and recomputes, the draft
    reconciles its state with whatever tokens the request has when it is proposed for again."""
    llm = LLM(str(stories260k), kv_cache_memory="256KiB", max_num_seqs=8, max_num_batched_tokens=64,
              speculative=f"tree:{stories260k},k=5,nodes=8,overlap=1")
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert_all_blocks_free(llm)
