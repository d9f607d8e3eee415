"""Prompt lookup decoding (n-gram; Saxena 2023, vLLM's `ngram` and llama.cpp's lookup decoding):
find the latest earlier occurrence of the context's last n tokens (n from `max_n` down to `min_n`)
and propose the k tokens that followed it (a match overlapping the end repeats its period). No model,
no state; deterministic candidates."""

from __future__ import annotations

from frugal.request import Request
from frugal.spec.proposer import Proposal, Proposer


def lookup_continuation(token_ids: list[int], max_n: int, min_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest suffix n-gram."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n:]
        # Latest start s < length - n with token_ids[s:s+n] == suffix.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                # Copy token by token, so a match overlapping the end continues its period
                # (in "a b a b a b" the match two back yields "a b a b ...", not one token).
                follow: list[int] = []
                for i in range(start + n, start + n + k):
                    follow.append(token_ids[i] if i < length else follow[i - length])
                return follow
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1, k: int = 5):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= n, got min_n={min_n}, n={max_n}")
        self.max_n = max_n
        self.min_n = min_n
        self.k = k

    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        proposals = {}
        for request in requests:
            k = min(self.k, num_tokens.get(request.request_id, 0))
            if k <= 0:
                continue
            tokens = lookup_continuation(request.all_token_ids, self.max_n, self.min_n, k)
            if tokens:
                proposals[request.request_id] = Proposal(tokens)
        return proposals
