"""Request traces in the Azure LLM inference format (`TIMESTAMP,ContextTokens,GeneratedTokens`,
Patel et al., "Splitwise", ISCA 2024), and fitting them to a model's context.

A trace row becomes a `TraceRequest`: arrival time in seconds after the first row (divided by the
rate scale), prompt length and output length. Production prompts are far longer than a small
model's context, so `fit_to_context` scales every prompt length by one factor (so the shape of the
length distribution is kept) until the longest fills at most `max_prompt_fraction` of the context,
then clips each output to the room left; what it did is returned as numbers for the result JSON.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from frugal.errors import FrugalError

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float      # seconds after the first request
    prompt_len: int
    output_len: int


def load_azure_trace(path: Path | str, num_requests: int | None = None, start: int = 0,
                     rate_scale: float = 1.0) -> list[TraceRequest]:
    """Rows `start .. start + num_requests` of an Azure-format CSV, arrivals relative to the first
    of them and divided by `rate_scale` (2.0 = twice the request rate). Raises FrugalError naming the
    file and row for a missing column or a bad value."""
    if not rate_scale > 0:
        raise FrugalError(f"rate scale must be positive, got {rate_scale}")
    if start < 0 or (num_requests is not None and num_requests < 1):
        raise FrugalError(f"need start >= 0 and num_requests >= 1, got {start} and {num_requests}")
    path = Path(path)
    if not path.is_file():
        raise FrugalError(f"trace {path} does not exist")
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise FrugalError(f"trace {path} lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            if line - 2 < start:
                continue
            if num_requests is not None and len(rows) >= num_requests:
                break
            try:
                when = datetime.fromisoformat(row["TIMESTAMP"].strip())
                prompt_len, output_len = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError) as exc:
                raise FrugalError(f"{path}:{line}: cannot read {row}: {exc}") from exc
            if prompt_len < 1 or output_len < 1:
                raise FrugalError(f"{path}:{line}: token counts must be >= 1, got {prompt_len}, {output_len}")
            rows.append((when, prompt_len, output_len))
    if not rows:
        raise FrugalError(f"trace {path} has no rows from row {start}")
    first = rows[0][0]
    requests = [TraceRequest((when - first).total_seconds() / rate_scale, p, o) for when, p, o in rows]
    return sorted(requests, key=lambda r: r.arrival_s)


def _stats(values: list[int]) -> dict:
    return {"mean": sum(values) / len(values), "max": max(values), "min": min(values),
            "total": sum(values)}


def fit_to_context(requests: list[TraceRequest], max_model_len: int,
                   max_prompt_fraction: float = 0.5) -> tuple[list[TraceRequest], dict]:
    """Scale prompt lengths (one factor for all) so the longest is at most `max_prompt_fraction` of
    `max_model_len`, then clip outputs so prompt + output <= max_model_len - 1 (the engine needs the
    prompt plus every output token to fit). Returns the fitted requests and a record of the change."""
    if not 0 < max_prompt_fraction < 1:
        raise FrugalError(f"max_prompt_fraction must be in (0, 1), got {max_prompt_fraction}")
    longest = max(r.prompt_len for r in requests)
    prompt_budget = max(1, int(max_model_len * max_prompt_fraction))
    scale = min(1.0, prompt_budget / longest)
    fitted, num_clipped = [], 0
    for request in requests:
        prompt_len = min(prompt_budget, max(1, round(request.prompt_len * scale)))
        room = max_model_len - 1 - prompt_len
        output_len = min(request.output_len, room)
        num_clipped += output_len < request.output_len
        fitted.append(TraceRequest(request.arrival_s, prompt_len, output_len))
    record = {
        "max_model_len": max_model_len,
        "max_prompt_fraction": max_prompt_fraction,
        "prompt_scale": scale,
        "num_outputs_clipped": num_clipped,
        "note": (f"prompt lengths multiplied by {scale:.4g} so the longest fits {max_prompt_fraction:.0%} of the "
                 f"{max_model_len}-token context; {num_clipped} output length(s) clipped to the room left"),
        "trace_prompt_tokens": _stats([r.prompt_len for r in requests]),
        "trace_output_tokens": _stats([r.output_len for r in requests]),
        "prompt_tokens": _stats([r.prompt_len for r in fitted]),
        "output_tokens": _stats([r.output_len for r in fitted]),
    }
    return fitted, record


def synthetic_prompt(length: int, vocab_size: int, rng: random.Random, bos_token_id: int | None = 1) -> list[int]:
    """`length` token ids: BOS (when the model has one) then uniform ids from [3, vocab_size), which
    skips the usual <unk>/<s>/</s> ids; distinct prompts share no prefix worth caching."""
    body = [rng.randrange(3, vocab_size) for _ in range(length - (bos_token_id is not None))]
    return ([bos_token_id] if bos_token_id is not None else []) + body
