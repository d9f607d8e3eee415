"""Token-tree draft proposer after LLMCad (Xu et al. 2023, "LLMCad: Fast and Scalable On-device Large
Language Model Inference"): a small draft model grows a token tree, branching where it is unsure and
handing the tree to the target once its accumulated uncertainty crosses a self-adjusting threshold
(the policy lives in uncertainty.py); optionally it drafts the next round while the target
verifies this one (speculative generation during verification).

Draft KV with one-token pages. The draft's paged KV cache uses block_size 1 (its own `BlockPool`,
no prefix caching), so a block table is a list of token slots in position order and every tree node
can be attended as its own batch entry: prefix slots + its ancestors' slots + its own slot. A tree
level is therefore one batched decode pass over all frontier nodes of all requests, with no tree
mask, and a node's position is the root's + its depth. After verification the accepted path's
slots simply become part of the request's committed table (their K/V were computed at exactly those
positions); every other node's slot is freed. Invariants: `state.slots[i]` holds the K/V of
`state.tokens[i]` at position i; a tree's root is `state.tokens[-1]`, fed; every slot a request holds
is in `state.slots`, its tree or its prefetch, and all return to the pool in `finish`.

Rounds. `propose` (1) matches the verified tokens against the last tree (committing fed nodes on the
accepted path, feeding the threshold policy whether the path ran to a leaf), (2) takes a prefetched
tree if its guessed prefix came true, else feeds the new tokens (one catch-up pass, the root's
distribution included), (3) expands level by level, (4) with `overlap`, starts a worker thread that
guesses the next round's prefix (the most confident path fully accepted, then the draft's argmax as
the target's bonus token) and drafts its tree while the engine runs the target pass. The next
`propose` (or `finish`) joins the worker first, so draft state is only touched by one thread at a
time (the worker stops at its next pass boundary; an interrupted tree is finished by the next
`propose` if its guess came true). Seeded requests draw each tree from a generator seeded by the
request's seed and the root's position, apart from the target's, so their output does not depend on
thread timing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from frugal.core.block_pool import BlockPool, KVCacheBlock
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.request import Request
from frugal.spec.proposer import Proposal, Proposer
from frugal.spec.token_tree import (DraftTree, Prefetch, TreeNode, common_prefix, draft_seed, path_to,
                                     tree_proposal)
from frugal.spec.uncertainty import AdaptiveThreshold, TreeShape, allot_children, draw_children, surprisal
from frugal.spec.verify import sampling_probs

logger = logging.getLogger(__name__)


# Drafting during verification only for requests whose guesses come true often enough to pay for the
# worker's share of the CPU (a miss costs the overlapped draft passes); others re-probe now and then.
_HIT_PRIOR = 0.5
_HIT_DECAY = 0.8
_MIN_HIT_RATE = 0.25
_PROBE_INTERVAL = 8


@dataclass(eq=False)
class _State:
    request_id: str
    tokens: list[int] = field(default_factory=list)          # committed tokens (K/V in `slots`)
    slots: list[KVCacheBlock] = field(default_factory=list)
    tree: DraftTree | None = None
    prefetch: Prefetch | None = None
    hit_rate: float = _HIT_PRIOR        # exponentially weighted share of prefetches that came true
    rounds_without_prefetch: int = 0


@dataclass(eq=False)
class _Growing:
    """A tree being expanded this round, and the nodes fed in the last pass (awaiting children)."""

    state: _State
    request: Request
    tree: DraftTree
    frontier: list[int]


class TreeDraftProposer(Proposer):
    name = "tree"

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], num_slots: int,
                 device: torch.device, shape: TreeShape, threshold: AdaptiveThreshold, *, overlap: bool = False):
        assert kv_caches[0].shape[2] == 1, "the tree draft's KV cache has one-token blocks"
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.shape = shape
        self.threshold = threshold
        self.overlap = overlap
        self.pool = BlockPool(num_slots, enable_caching=False)
        self._states: dict[str, _State] = {}
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._cancel = threading.Event()   # set by the engine thread: the worker stops between passes
        # False: `propose` waits for the worker to finish (tests that count hits need no timing luck).
        self.interruptible = True
        self.num_prefetch_hits = 0
        self.num_prefetch_misses = 0

    @property
    def num_used_blocks(self) -> int:
        self._join()
        return self.pool.num_used_blocks

    # ---- lifecycle ------------------------------------------------------------------------------

    def finish(self, request_ids: list[str]) -> None:
        self._join()
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            self.threshold.forget(request_id)
            if state is not None:
                self._drop_tree(state)
                self._drop_prefetch(state)
                self.pool.free_blocks(reversed(state.slots))
                state.slots, state.tokens = [], []

    def _drop_tree(self, state: _State, keep: set[int] = frozenset()) -> None:
        if state.tree is not None:
            self.pool.free_blocks([s for s in state.tree.slots()[1:] if id(s) not in keep])
            state.tree = None

    def _drop_prefetch(self, state: _State) -> None:
        if state.prefetch is not None:
            self.pool.free_blocks(state.prefetch.tree.slots())
            state.prefetch = None

    def _generator(self, request: Request, num_known: int) -> torch.Generator | None:
        """The draws of the tree rooted after `num_known` tokens (None: the global generator)."""
        seed = request.sampling_params.seed
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(draft_seed(seed, num_known))

    def _alloc(self, count: int) -> list[KVCacheBlock] | None:
        if count > self.pool.num_free_blocks:
            return None
        return self.pool.get_new_blocks(count)

    # ---- propose --------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        self._join()
        items: list[_Growing] = []
        feeds: list[tuple[_Growing, int]] = []                    # nodes to feed next
        catch_up: list[tuple[_Growing, list[int]]] = []          # trees whose root is fed first, tokens
        for request in requests:
            limit = min(num_tokens.get(request.request_id, 0), self.shape.max_nodes)
            if limit <= 0:
                continue
            state = self._states.get(request.request_id)
            if state is None:
                state = self._states[request.request_id] = _State(request.request_id)
            known = request.all_token_ids
            max_depth = min(limit, self.shape.max_depth)
            prefetch = self._reconcile(state, known, limit)
            if prefetch is not None:  # drafted during verification: grow on from where it stopped
                item = _Growing(state, request, prefetch.tree, [])
                items.append(item)
                feeds += [(item, i) for i in prefetch.pending
                          if i < len(prefetch.tree.nodes) and prefetch.tree.nodes[i].depth < max_depth]
                continue
            new_slots = self._alloc(len(known) - len(state.tokens))
            if new_slots is None:
                logger.debug("tree draft KV full; no candidates for %s this step", request.request_id)
                continue
            feed = known[len(state.tokens):]
            state.tokens.extend(feed)
            state.slots.extend(new_slots)
            root = TreeNode(state.tokens[-1], -1, 0, 1.0, state.slots[-1])
            tree = DraftTree([s.block_id for s in state.slots[:-1]], [root], limit, max_depth,
                         self.threshold.value(request.request_id), self._generator(request, len(known)))
            item = _Growing(state, request, tree, [0])
            items.append(item)
            catch_up.append((item, feed))
        if catch_up:
            entries = [([s.block_id for s in item.state.slots], feed) for item, feed in catch_up]
            logits = self._forward(entries)  # [len(catch_up), V] at each root
            for row, (item, _) in enumerate(catch_up):
                feeds += [(item, i) for i in self._add_children(item, logits[row:row + 1])]
        self._expand(feeds)
        proposals = {}
        for item in items:
            item.state.tree = item.tree
            proposal = tree_proposal(item.tree, item.request)
            if proposal is not None:
                proposals[item.request.request_id] = proposal
        if self.overlap and proposals:
            self._start_prefetch([item for item in items if len(item.tree.nodes) > 1])
        return proposals

    def _reconcile(self, state: _State, known: list[int], limit: int) -> Prefetch | None:
        """Fold the verified tokens into the state: commit the accepted path's fed nodes, free the
        rest, record where verification ended. -> the prefetch if its guess came true and it was
        drafted for this round's node limit (its root then committed), else None with
        `state.tokens` cut to a prefix of known[:-1] at most."""
        tree, prefetch = state.tree, state.prefetch
        state.prefetch = None
        committed: set[int] = set()
        if tree is not None and state.tokens == known[:len(state.tokens)]:
            index, position = 0, len(state.tokens)
            while position < len(known):
                match = next((c for c in tree.nodes[index].children if tree.nodes[c].token == known[position]), None)
                if match is None:
                    self.threshold.observe(state.request_id, ended_on_leaf=not tree.nodes[index].children)
                    break
                index, position = match, position + 1
            for node_index in path_to(tree, index):
                node = tree.nodes[node_index]
                if node.slot is None:
                    break
                state.tokens.append(node.token)
                state.slots.append(node.slot)
                committed.add(id(node.slot))
        self._drop_tree(state, committed)
        if prefetch is not None:
            if prefetch.tokens == known and state.tokens == known[:-1] and prefetch.tree.max_nodes == limit:
                state.tokens.append(known[-1])
                state.slots.append(prefetch.tree.nodes[0].slot)
                self.num_prefetch_hits += 1
                state.hit_rate = _HIT_DECAY * state.hit_rate + (1.0 - _HIT_DECAY)
                return prefetch
            self.num_prefetch_misses += 1
            state.hit_rate *= _HIT_DECAY
            self.pool.free_blocks(prefetch.tree.slots())
        keep = min(common_prefix(state.tokens, known), len(known) - 1)
        if keep < len(state.slots):
            self.pool.free_blocks(reversed(state.slots[keep:]))
            del state.slots[keep:], state.tokens[keep:]
        return None

    # ---- drafting -------------------------------------------------------------------------------

    def _expand(self, feeds: list[tuple[_Growing, int]], stop=None) -> list[tuple[_Growing, int]]:
        """Grow trees level by level: feed the given nodes (one batched pass over all trees), draft
        their children, repeat. `stop()` true between passes ends early -> the nodes still to feed
        (each tree is a valid tree at every point)."""
        while feeds:
            if stop is not None and stop():
                return feeds
            slots = self._alloc(len(feeds))
            if slots is None:
                logger.debug("tree draft KV full; trees stop growing")
                return []
            entries = []
            for (item, index), slot in zip(feeds, slots):
                item.tree.nodes[index].slot = slot
                entries.append((item.tree.table(index), [item.tree.nodes[index].token]))
            logits = self._forward(entries)  # [len(feeds), V]
            rows: dict[_Growing, list[int]] = {}          # tree -> its rows of `logits`
            for item in dict.fromkeys(item for item, _ in feeds):
                item.frontier = []
            for row, (item, index) in enumerate(feeds):
                rows.setdefault(item, []).append(row)
                item.frontier.append(index)
            feeds = []
            for item, item_rows in rows.items():
                feeds += [(item, i) for i in self._add_children(item, logits[item_rows])]
        return []

    def _add_children(self, item: _Growing, rows: torch.Tensor) -> list[int]:
        """Draft the children of `item.frontier` from their logits rows [len(frontier), V]; -> the
        new nodes to expand (feed) next."""
        tree, params = item.tree, item.request.sampling_params
        greedy = params.is_greedy
        probs = rows.softmax(dim=-1) if greedy else sampling_probs(rows, params)  # [F, V]
        top2 = probs.topk(2, dim=-1).values  # [F, 2]
        ratios = (top2[:, 1] / top2[:, 0].clamp(min=1e-30)).tolist()
        frontier = [tree.nodes[i] for i in item.frontier]
        budget = tree.max_nodes - (len(tree.nodes) - 1)
        counts = allot_children([(node.confidence, r) for node, r in zip(frontier, ratios)], budget, self.shape)
        expand = []
        for parent_index, node, q, count in zip(item.frontier, frontier, probs, counts):
            if count == 0:
                continue
            tokens = draw_children(q, count, greedy, tree.generator)
            token_probs = q[tokens].tolist()
            seen = set()
            for token, p in zip(tokens, token_probs):
                child = TreeNode(token, parent_index, node.depth + 1, node.confidence * p, q=None if greedy else q,
                              uncertainty=node.uncertainty + surprisal(p))
                tree.nodes.append(child)
                node.children.append(len(tree.nodes) - 1)
                # A repeated draw is always rejected after its first copy: never worth expanding.
                if token not in seen and child.depth < tree.max_depth and child.uncertainty <= tree.threshold:
                    expand.append(len(tree.nodes) - 1)
                seen.add(token)
        if len(tree.nodes) - 1 >= tree.max_nodes:
            return []
        return expand

    def _forward(self, entries: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """One draft pass. entries: (slot ids of positions 0..p, the tokens at the last positions
        of that table) -> logits [len(entries), V] at each entry's last position."""
        token_ids, positions, slot_mapping, query_start_loc, query_lens, seq_lens = [], [], [], [0], [], []
        for table, tokens in entries:
            seq_len, count = len(table), len(tokens)
            token_ids.extend(tokens)
            positions.extend(range(seq_len - count, seq_len))
            slot_mapping.extend(table[seq_len - count:])
            query_start_loc.append(query_start_loc[-1] + count)
            query_lens.append(count)
            seq_lens.append(seq_len)
        block_tables = torch.zeros((len(entries), max(seq_lens)), dtype=torch.int64)  # [entries, max_len]
        for i, (table, _) in enumerate(entries):
            block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int64)
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            block_tables=block_tables.to(device), query_start_loc=query_start_loc, query_lens=query_lens,
            seq_lens=seq_lens, block_size=1)
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
        hidden = self.model(input_ids, torch.tensor(positions, dtype=torch.int64, device=device), self.kv_caches,
                            metadata)  # [num_tokens, hidden]
        last_rows = torch.tensor(query_start_loc[1:], dtype=torch.int64, device=device) - 1
        return self.model.compute_logits(hidden[last_rows]).float()  # [entries, V]

    # ---- drafting during verification -----------------------------------------------------------

    def _start_prefetch(self, items: list[_Growing]) -> None:
        jobs = []
        for item in items:
            path = item.tree.most_confident_path()
            # The next round's node limit if the guess comes true (SpecDecoder: room under max_tokens).
            room = item.request.max_output_tokens - item.request.num_output_tokens - len(path) - 2
            state = item.state
            if state.hit_rate < _MIN_HIT_RATE and state.rounds_without_prefetch < _PROBE_INTERVAL:
                state.rounds_without_prefetch += 1
                continue
            if path and min(room, self.shape.max_nodes) > 0:
                state.rounds_without_prefetch = 0
                jobs.append((item, path, min(room, self.shape.max_nodes)))
        if jobs:
            self._worker = threading.Thread(target=self._prefetch, args=(jobs,), name="tree-draft-prefetch",
                                            daemon=True)
            self._worker.start()

    def _join(self) -> None:
        """Stop the worker at its next pass boundary and wait for it."""
        if self._worker is not None:
            if self.interruptible:
                self._cancel.set()
            self._worker.join()
            self._cancel.clear()
            self._worker = None
        if self._worker_error is not None:
            error, self._worker_error = self._worker_error, None
            raise RuntimeError("tree draft prefetch failed") from error

    def _prefetch(self, jobs: list[tuple[_Growing, list[int], int]]) -> None:
        """Worker: for each tree, feed the leaf of its most confident path, guess the target's bonus
        token (the draft's argmax there), feed it as the next root and grow the next tree."""
        try:
            with torch.inference_mode():
                self._prefetch_jobs(jobs)
        except BaseException as error:  # surfaced by _join in the engine thread
            self._worker_error = error

    def _prefetch_jobs(self, jobs: list[tuple[_Growing, list[int], int]]) -> None:
        if self._cancel.is_set():
            return
        leaves = [item.tree.nodes[path[-1]] for item, path, _ in jobs]
        # A leaf may be fed already (its children did not fit): feeding it again rewrites the same K/V.
        slots = self._alloc(len(jobs) + sum(leaf.slot is None for leaf in leaves))
        if slots is None:
            return
        entries = []
        for (item, path, _), leaf in zip(jobs, leaves):
            if leaf.slot is None:
                leaf.slot = slots.pop()
            entries.append((item.tree.table(path[-1]), [leaf.token]))
        guesses = self._forward(entries).argmax(dim=-1).tolist()  # [jobs]
        if self._cancel.is_set():  # the fed leaves stay useful; the roots were never fed
            self.pool.free_blocks(slots)
            return
        entries, prefetches = [], []
        for j, (item, path, limit) in enumerate(jobs):
            base = item.tree.table(path[-1])
            root = TreeNode(guesses[j], -1, 0, 1.0, slots.pop())
            tokens = item.state.tokens + [item.tree.nodes[i].token for i in path] + [guesses[j]]
            # As the next round would draft it after a hit: the threshold after a leaf ending.
            threshold = self.threshold.value_after(item.state.request_id, ended_on_leaf=True)
            tree = DraftTree(base, [root], limit, min(limit, self.shape.max_depth), threshold,
                         self._generator(item.request, len(tokens)))
            prefetches.append(Prefetch(tokens, tree))
            item.state.prefetch = prefetches[-1]
            entries.append((base + [root.slot.block_id], [root.token]))
        logits = self._forward(entries)  # [jobs, V] at each guessed root
        feeds = []
        for j, ((item, _, _), prefetch) in enumerate(zip(jobs, prefetches)):
            growing = _Growing(item.state, item.request, prefetch.tree, [0])
            feeds += [(growing, i) for i in self._add_children(growing, logits[j:j + 1])]
        pending = self._expand(feeds, stop=self._cancel.is_set)
        for growing, index in pending:
            growing.state.prefetch.pending.append(index)
