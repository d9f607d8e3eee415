"""Request: the only mutable per-request record. Owned by the scheduler; the runner reads it.

Invariants: `num_computed_tokens <= num_tokens + len(spec_token_ids)`; `spec_parent_ids` is None (a
chain) or as long as `spec_token_ids` (a token tree, see spec/proposer.py); `all_token_ids` is always
`prompt_token_ids + output_token_ids`; once `status` is finished it never changes again.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from frugal.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SWAPPED = "swapped"          # preempted with its KV kept in the slow tier (core/swap.py)
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 2048
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Tokens found in the prefix cache when first scheduled (-1: not scheduled yet).
    num_cached_tokens: int = -1
    # Speculative tokens proposed for the next step (verified by the target; see spec/).
    spec_token_ids: list[int] = field(default_factory=list)
    # Their tree: parent node of each (0 = the last known token, node i = spec_token_ids[i-1]); None = chain.
    spec_parent_ids: list[int] | None = None
    num_preemptions: int = 0
    # FastServe-style multi-level queue position (0 = highest priority); policies own its meaning.
    queue_level: int = 0
    # BENCHMARK ORACLE ONLY: the true number of output tokens, known to a trace replay and read by
    # the `sjf-oracle` scheduling policy; never set for real traffic.
    oracle_output_len: int | None = None
    # A stop token id or stop string that ended the request (None for EOS / length).
    stop_reason: int | str | None = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self._all_token_ids: list[int] = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self._all_token_ids) + len(self.spec_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output, kept in sync by `append_output_token_ids`; do not mutate."""
        return self._all_token_ids

    @property
    def max_output_tokens(self) -> int:
        """Output tokens allowed by max_tokens and by the context length."""
        room = self.max_model_len - self.num_prompt_tokens
        if self.sampling_params.max_tokens is None:
            return room
        return min(self.sampling_params.max_tokens, room)

    def clear_spec_tokens(self) -> None:
        """Drop the speculative candidates (and their tree)."""
        self.spec_token_ids.clear()
        self.spec_parent_ids = None

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
