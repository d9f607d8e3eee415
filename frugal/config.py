"""Engine configuration: frozen dataclasses, validated once at the edge (`EngineConfig.create`).

Each component receives only its slice (`CacheConfig` for the KV manager, `SchedulerConfig` for the
scheduler, ...) and never mutates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from frugal.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_memory(value: str | int | float) -> int:
    """'2GiB' / '512MiB' / '1.5GB' / 12345 -> bytes. Raises ConfigError naming the value."""
    if isinstance(value, bool):
        raise ConfigError(f"memory size must be a number of bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"memory size must be positive, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot parse memory size {value!r}; use e.g. '2GiB', '512MiB' or a number of bytes")
    num_bytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if num_bytes <= 0:
        raise ConfigError(f"memory size must be positive, got {value!r}")
    return num_bytes


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` is derived from the memory budget once the model shape is known."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 2 * 1024**3
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: at most `max_num_seqs` running requests and
    `max_num_batched_tokens` tokens per step (long prompts are prefilled in chunks)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len})")


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and how it is run. `dtype` is resolved ('auto' -> a torch dtype name)
    by the loader once the checkpoint's config is read."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    revision: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if not (self.device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
