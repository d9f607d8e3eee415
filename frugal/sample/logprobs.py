"""Logprobs of sampled tokens, from the model's RAW distribution (vLLM's default "raw_logprobs").

`log_softmax(logits)` is taken before penalties, temperature and truncation, so a token's logprob
says what the model thinks, independent of how the request samples.

Always true: rank is 1 + the number of tokens with a strictly larger logprob (1 = best; ties share
the better rank); the top-k list is sorted best first and has exactly k = params.logprobs entries
(0: empty, only the sampled token is reported).
"""

from __future__ import annotations

import torch

# (sampled token logprob, its rank, [(token_id, logprob), ...] top-k best first) - RunnerOutput's format
TokenLogprobsEntry = tuple[float, int, list[tuple[int, float]]]


def compute_raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 log-probabilities of the unmodified logits."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(
    raw_logprobs: torch.Tensor,
    sampled_token_ids: torch.Tensor,
    num_logprobs: list[int | None],
) -> list[TokenLogprobsEntry | None]:
    """Per row: the sampled token's logprob and rank plus the row's top-k, or None when the row did
    not ask for logprobs. One device->host copy for the whole batch."""
    # [N, V] raw_logprobs; [N] sampled_token_ids
    max_k = max((k for k in num_logprobs if k is not None), default=None)
    if max_k is None:
        return [None] * len(num_logprobs)
    sampled = sampled_token_ids.long().unsqueeze(-1)                  # [N, 1]
    sampled_logprob = raw_logprobs.gather(-1, sampled)                # [N, 1]
    ranks = (raw_logprobs > sampled_logprob).sum(dim=-1) + 1          # [N]
    if max_k > 0:
        top_values, top_ids = torch.topk(raw_logprobs, max_k, dim=-1)  # [N, max_k], sorted best first
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    sampled_list = sampled_logprob.squeeze(-1).tolist()
    ranks_list = ranks.tolist()

    entries: list[TokenLogprobsEntry | None] = []
    for row, k in enumerate(num_logprobs):
        if k is None:
            entries.append(None)
            continue
        top = list(zip(top_ids_list[row][:k], top_values_list[row][:k])) if k > 0 else []
        entries.append((sampled_list[row], int(ranks_list[row]), top))
    return entries
