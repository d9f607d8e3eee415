"""What the engine hands back to users: RequestOutput (whole result), CompletionDelta (streaming)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token under the model's raw distribution
    decoded_token: str | None = None


# One entry per generated token: the sampled token and the top-k alternatives, token id -> Logprob.
TokenLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Speculative decoding (frugal.spec.decoder.SpecStats snapshot): accepted tokens per target step,
    # acceptance by position. None without speculation.
    spec: object | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens computed per second, from first scheduling to the first token."""
        if self.first_token_time is None or self.first_scheduled_time is None:
            return None
        elapsed = self.first_token_time - self.first_scheduled_time
        computed = self.num_prompt_tokens - self.num_cached_tokens
        return computed / elapsed if elapsed > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens after the first, per second of decoding."""
        if self.first_token_time is None or self.finished_time is None or self.num_output_tokens < 2:
            return None
        elapsed = self.finished_time - self.first_token_time
        return (self.num_output_tokens - 1) / elapsed if elapsed > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "time_to_first_token_s": self.time_to_first_token,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "num_preemptions": self.num_preemptions,
            **({"spec": self.spec.as_dict()} if self.spec is not None else {}),
        }


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


@dataclass
class CompletionDelta:
    """New text and tokens since the previous delta of the same request."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    metrics: RequestMetrics | None = field(default=None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
