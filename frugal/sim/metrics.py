"""Per-request latency records and their summary (mean and percentiles of JCT and TTFT).

JCT (job completion time) = finish - arrival; TTFT = first token - arrival; both in seconds on the
replay's clock. Percentiles use linear interpolation (numpy's default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    first_token_s: float
    finished_s: float
    prompt_len: int
    output_len: int
    num_preemptions: int = 0

    @property
    def jct_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max())}


def summarize(records: list[RequestRecord]) -> dict:
    """JCT and TTFT statistics, throughput and preemptions of one run."""
    assert records, "no finished request to summarize"
    start = min(r.arrival_s for r in records)
    end = max(r.finished_s for r in records)
    return {
        "num_requests": len(records),
        "jct_s": _stats([r.jct_s for r in records]),
        "ttft_s": _stats([r.ttft_s for r in records]),
        "duration_s": end - start,
        "requests_per_s": len(records) / max(end - start, 1e-9),
        "output_tokens_per_s": sum(r.output_len for r in records) / max(end - start, 1e-9),
        "num_preemptions": sum(r.num_preemptions for r in records),
    }


def records_to_json(records: list[RequestRecord]) -> list[dict]:
    return [asdict(r) for r in records]
