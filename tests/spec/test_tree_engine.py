"""Token-tree speculation inside the engine: one target pass verifies a whole tree (positions by
depth, ancestor-only attention), the accepted path's K/V is moved onto the positions after the root,
and proposers that ask for them receive the target's final hidden states.

The tree proposer here is real, not scripted: its branches are the top-2 tokens of a *different*
model (the target's weights with seeded Gaussian noise, run by `transformers` without a KV cache), so
acceptance is partial and the accepted path often runs through a second branch or a node that is
not the next one in node order (K/V compaction with a_j != j; asserted to happen).
"""

from __future__ import annotations

import pytest
import torch

from frugal import LLM, SamplingParams
from frugal.request import Request
from frugal.spec.decoder import SpecDecoder
from frugal.spec.proposer import Proposal, Proposer
from tiny_models import load_hf, make_tiny_checkpoint

from .test_verify import chi_square_p_value

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the", "One day, a little boy",
           "The sun was shining and the birds", "Sam had a big red ball", "Mom said", "There was a dog"]
MAX_TOKENS = 24
K_MAX = 8  # tree nodes per step


def perturbed_draft(model_dir, noise: float, seed: int = 0):
    """The checkpoint at model_dir with N(0, (noise * std)^2) added to every matrix: a related but
    different model."""
    model = load_hf(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=gen) * noise * param.std())
    return model


class TopTwoTreeProposer(Proposer):
    """Each node on the draft's greedy path gets two children (the draft's top-2 tokens there), every
    other node one (its top-1); nodes are numbered breadth-first, so any prefix is a tree:

        root -> g1, s1;  g1 -> g2, s2;  s1 -> t2;  g2 -> g3, s3;  s2 -> ...;  t2 -> ...
    """

    name = "test-tree"

    def __init__(self, draft) -> None:
        self.draft = draft
        self.num_trees = 0

    @torch.no_grad()
    def _top2(self, sequences: list[list[int]]) -> list[list[int]]:
        """The draft's top-2 next tokens after each sequence (equal lengths are batched)."""
        result: list[list[int]] = [[] for _ in sequences]
        by_length: dict[int, list[int]] = {}
        for index, sequence in enumerate(sequences):
            by_length.setdefault(len(sequence), []).append(index)
        for indices in by_length.values():
            input_ids = torch.tensor([sequences[i] for i in indices])  # [b, L]
            logits = self.draft(input_ids).logits[:, -1]  # [b, V]
            for i, top in zip(indices, logits.topk(2, dim=-1).indices.tolist()):
                result[i] = top
        return result

    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        # Per request: nodes (token, parent) and the frontier of (node id, path tokens, on greedy path).
        trees = {r.request_id: ([], [(0, list(r.all_token_ids), True)]) for r in requests}
        while True:
            active = [(rid, entry) for rid, (nodes, frontier) in trees.items() for entry in frontier
                      if len(nodes) < num_tokens[rid]]
            if not active:
                break
            tops = self._top2([path for _, (_, path, _) in active])
            for rid in trees:
                trees[rid][1].clear()
            for (rid, (node, path, greedy)), top in zip(active, tops):
                nodes, frontier = trees[rid]
                for rank, token in enumerate(top[:2 if greedy else 1]):
                    if len(nodes) < num_tokens[rid]:
                        nodes.append((token, node))
                        frontier.append((len(nodes), path + [token], greedy and rank == 0))
        self.num_trees += len(trees)
        return {rid: Proposal([t for t, _ in nodes], parent_ids=[p for _, p in nodes])
                for rid, (nodes, _) in trees.items() if nodes}


def install(llm: LLM, proposer: Proposer, k: int = K_MAX) -> SpecDecoder:
    """Plug a SpecDecoder over `proposer` into an engine built without speculation."""
    engine = llm.engine
    spec = SpecDecoder(proposer, k, adaptive=False)
    engine.spec = spec
    engine.runner.verifier = spec.verify
    engine.runner.hidden_state_observer = spec.hidden_state_observer
    return spec


def make_llm(model, **kwargs) -> LLM:
    kwargs.setdefault("max_num_seqs", 8)
    return LLM(str(model), kv_cache_memory="16MiB", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tree-target"), "llama", seed=0)


# Noise scales giving partial acceptance (roughly 0.7 at depth 1, 0.3 at depth 3 under greedy).
STORIES_NOISE = 0.15
MODELS = {"tiny": ("tiny_target", 0.1), "stories260k": ("stories260k", STORIES_NOISE)}


def model_and_draft(request, name):
    fixture, noise = MODELS[name]
    model_dir = request.getfixturevalue(fixture)
    return model_dir, perturbed_draft(model_dir, noise)


def prompts_of(llm: LLM) -> list[list[int]]:
    """The prompts as token ids, cut to mixed lengths (2 .. 12 tokens)."""
    ids = [llm.engine.tokenizer.encode(p) for p in PROMPTS]
    return [p[: 2 + (3 * i) % 11] for i, p in enumerate(ids)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 8])
def test_tree_greedy_output_identical_to_plain_greedy(request, name, batch):
    model_dir, draft = model_and_draft(request, name)
    plain = make_llm(model_dir)
    prompts = prompts_of(plain)[:batch]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]

    llm = make_llm(model_dir)
    proposer = TopTwoTreeProposer(draft)
    install(llm, proposer)
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.scheduler.num_used_blocks == 0
    assert proposer.num_trees > 0
    # Partial acceptance, and accepted paths that leave node order (K/V had to move).
    stats = [o.metrics.spec for o in outputs]
    assert 0 < sum(s.num_accepted_tokens for s in stats) < sum(s.num_proposed_tokens for s in stats)
    assert llm.engine.runner.num_kv_slots_moved > 0
    for s, output in zip(stats, outputs):
        assert s.num_generated_tokens == len(output.outputs[0].token_ids)
        assert len(s.proposed_by_position) <= K_MAX and all(0.0 <= a <= 1.0 for a in s.acceptance_by_position)
        assert s.proposed_by_position == sorted(s.proposed_by_position, reverse=True)  # steps reaching depth d


def test_tree_trimmed_by_a_small_step_budget(request):
    """8 requests and a 14-token step budget: the scheduler cuts trees to their first nodes."""
    model_dir, draft = model_and_draft(request, "stories260k")
    plain = make_llm(model_dir)
    prompts = prompts_of(plain)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    llm = make_llm(model_dir, max_num_batched_tokens=14)
    install(llm, TopTwoTreeProposer(draft))
    cut = []
    original = llm.engine.scheduler._make_scheduled

    def spy(req, num_new_tokens, block_ids):
        scheduled = original(req, num_new_tokens, block_ids)
        if len(scheduled.spec_token_ids) < len(req.spec_token_ids):
            cut.append(scheduled.spec_parent_ids)
        return scheduled

    llm.engine.scheduler._make_scheduled = spy
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.scheduler.num_used_blocks == 0
    assert any(parents for parents in cut)


def test_tree_greedy_with_the_reference_backend(request):
    """The reference attention backend honours the tree mask too (the default CPU backend routes tree
    rows through SDPA)."""
    model_dir, draft = model_and_draft(request, "tiny")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    plain = make_llm(model_dir)
    prompts = prompts_of(plain)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    llm = make_llm(model_dir, attention_backend="reference")
    install(llm, TopTwoTreeProposer(draft))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert llm.engine.runner.num_kv_slots_moved > 0


def test_tree_greedy_under_preemption(stories260k):
    """A pool of 12 blocks for 8 requests: trees are dropped on preemption and recomputed after."""
    block_bytes = 2 * 5 * 16 * 4 * 8 * 4  # K+V, 5 layers, 16 tokens, 4 KV heads, head_dim 8, fp32
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = make_llm(stories260k)
    prompts = prompts_of(plain)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    llm = LLM(str(stories260k), dtype="float32", kv_cache_memory=12 * block_bytes, max_num_seqs=8)
    install(llm, TopTwoTreeProposer(perturbed_draft(stories260k, STORIES_NOISE)))
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0, "pool too large to force preemption"
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.scheduler.num_used_blocks == 0
    assert llm.engine.runner.num_kv_slots_moved > 0


def test_tree_sampling_preserves_the_target_distribution(stories260k):
    """Joint of the first three sampled tokens (top_k=3, temperature 1) with tree speculation against
    the exact target probabilities from `transformers`: t0 comes from the prefill, t1 and t2 from
    verifying a 4-node tree (two depth-1 siblings, two depth-2 children)."""
    hf = load_hf(stories260k)
    llm = make_llm(stories260k, max_num_seqs=64)
    proposer = TopTwoTreeProposer(perturbed_draft(stories260k, STORIES_NOISE))
    install(llm, proposer, k=4)
    prompt = llm.engine.tokenizer.encode("The cat")  # high-entropy continuations
    num_samples = 3000
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=6, ignore_eos=True, seed=i)
              for i in range(num_samples)]
    outputs = llm.generate([prompt] * num_samples, params)
    assert llm.engine.scheduler.num_used_blocks == 0

    def top3(prefixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = hf(torch.tensor(prefixes)).logits[:, -1].float()  # [b, V]
        values, indices = logits.topk(3, dim=-1)
        return indices, values.softmax(dim=-1)

    cells: dict[tuple[int, ...], float] = {}
    i0, p0 = top3([prompt])
    for a, pa in zip(i0[0].tolist(), p0[0].tolist()):
        i1, p1 = top3([prompt + [a]])
        for b, pb in zip(i1[0].tolist(), p1[0].tolist()):
            i2, p2 = top3([prompt + [a, b]])
            for c, pc in zip(i2[0].tolist(), p2[0].tolist()):
                cells[(a, b, c)] = pa * pb * pc
    keys = list(cells)
    counts = torch.zeros(len(keys) + 1)
    for output in outputs:
        triple = tuple(output.outputs[0].token_ids[:3])
        counts[keys.index(triple) if triple in cells else len(keys)] += 1
    assert counts[-1] == 0, "a token outside the target's top-3 was emitted"
    expected = torch.tensor([cells[k] for k in keys], dtype=torch.float64)
    # Pool the cells expected fewer than 5 times (chi-square validity).
    small = expected * num_samples < 5
    counts, expected = counts[:-1].double(), expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().unsqueeze(0)])
        expected = torch.cat([expected[~small], expected[small].sum().unsqueeze(0)])
    assert chi_square_p_value(counts, expected) > 1e-3
    stats = [o.metrics.spec for o in outputs]
    accepted = sum(s.num_accepted_tokens for s in stats)
    assert 0 < accepted < sum(s.num_proposed_tokens for s in stats)
    assert llm.engine.runner.num_kv_slots_moved > 0


class HiddenRecorder(TopTwoTreeProposer):
    """Pairs each hidden state it is handed with the position it belongs to: at the next `propose`
    the request's newest token is known, and the hidden state is that of the position before it."""

    wants_hidden_states = True

    def __init__(self, draft) -> None:
        super().__init__(draft)
        self.pending: dict[str, list[torch.Tensor]] = {}
        # (request id, position, target pass index, tokens that pass produced, hidden)
        self.paired: list[tuple[str, int, int, int, torch.Tensor]] = []
        self.num_observed = 0
        self._last_len: dict[str, int] = {}

    def observe_hidden_states(self, request_id: str, hidden: torch.Tensor) -> None:
        assert hidden.dim() == 1
        self.pending.setdefault(request_id, []).append(hidden)
        self.num_observed += 1

    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        for r in requests:
            hiddens = self.pending.pop(r.request_id, [])
            assert len(hiddens) == 1, f"{r.request_id}: {len(hiddens)} hidden states since the last proposal"
            new_tokens = r.num_tokens - self._last_len.get(r.request_id, r.num_prompt_tokens)
            self._last_len[r.request_id] = r.num_tokens
            index = sum(1 for p in self.paired if p[0] == r.request_id)
            self.paired.append((r.request_id, r.num_tokens - 2, index, new_tokens, hiddens[0]))
        return super().propose(requests, num_tokens)


def test_hidden_state_hook_matches_a_plain_full_forward(stories260k):
    hf = load_hf(stories260k)
    llm = make_llm(stories260k)
    recorder = HiddenRecorder(perturbed_draft(stories260k, STORIES_NOISE))
    install(llm, recorder)
    prompts = prompts_of(llm)[:4]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert recorder.num_observed == sum(o.metrics.spec.num_target_steps for o in outputs)
    sequences = {o.request_id: o.prompt_token_ids + o.outputs[0].token_ids for o in outputs}
    # Near max_tokens no candidates fit, so the last passes of a request are not followed by a
    # `propose`; its very last hidden state belongs to the position before its last token.
    assert len(recorder.paired) >= recorder.num_observed - 2 * len(outputs)
    for request_id, hiddens in recorder.pending.items():
        recorder.paired.append((request_id, len(sequences[request_id]) - 2, -1, 1, hiddens[-1]))
    for request_id, position, _, _, hidden in recorder.paired:
        with torch.no_grad():
            reference = hf.model(torch.tensor([sequences[request_id][: position + 1]])).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-5)
    # Prefill rows (the first pairing), verify passes with nothing accepted (root row) and with an
    # accepted path (deepest accepted node's row) were all checked.
    kinds = {("prefill" if index == 0 else "root" if new_tokens == 1 else "accepted")
             for _, _, index, new_tokens, _ in recorder.paired if index >= 0}
    assert kinds == {"prefill", "root", "accepted"}


def test_no_hidden_states_unless_asked(stories260k):
    llm = make_llm(stories260k)
    spec = install(llm, TopTwoTreeProposer(perturbed_draft(stories260k, STORIES_NOISE)))
    assert spec.hidden_state_observer is None and llm.engine.runner.hidden_state_observer is None


def test_tree_stats_count_depths_once_per_step():
    """Stats of a tree are by depth: 5 nodes over depths 1, 1, 2, 2, 3 count depths 1..3 once."""
    decoder = SpecDecoder(TopTwoTreeProposer(None), K_MAX, adaptive=False)
    req = Request("s", [1, 2, 3], SamplingParams(temperature=0))
    logits = torch.zeros(6, 16)
    best = [5, 0, 7, 0, 0, 0]  # root -> token 5 (node 2), node 2 -> token 7 (node 4), node 4 -> 0 (not 9)
    logits[torch.arange(6), torch.tensor(best)] = 1.0
    result = decoder.verify(req, [4, 5, 6, 7, 9], logits, None, parent_ids=[0, 0, 1, 2, 4])
    assert result.accepted_nodes == [2, 4] and result.token_ids == [5, 7, 0]
    stats = decoder.stats_of("s")
    assert stats.proposed_by_position == [1, 1, 1] and stats.accepted_by_position == [1, 1, 0]
    assert (stats.num_proposed_tokens, stats.num_accepted_tokens, stats.num_generated_tokens) == (5, 2, 3)
