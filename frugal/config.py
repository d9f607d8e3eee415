"""Engine configuration: frozen dataclasses, validated once at the edge (`EngineConfig.create`).

Each component receives only its slice (`CacheConfig` for the KV manager, `SchedulerConfig` for the
scheduler, ...) and never mutates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from frugal.errors import ConfigError
from frugal.quant.config import QuantConfig

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
    # KV swap space (FastServe): a slower tier outside the KV budget where preempted requests keep
    # their KV (pinned host memory on CUDA; host RAM on CPU, or a memory-mapped file in
    # `swap_path`, a directory). 0 = no swapping: preemption recomputes.
    swap_space_bytes: int = 0
    swap_path: str | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if isinstance(self.swap_space_bytes, bool) or not isinstance(self.swap_space_bytes, int) \
                or self.swap_space_bytes < 0:
            raise ConfigError(f"swap_space_bytes must be a non-negative integer, got {self.swap_space_bytes!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: at most `max_num_seqs` running requests and
    `max_num_batched_tokens` tokens per step (long prompts are prefilled in chunks)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    # Keyword options of `core.policy.make_policy(policy, ...)`, e.g. {"quantum_s": 0.01} or
    # {"prefill_profile": "benchmarks/prefill_profile.json"}; names are checked here, values there.
    policy_options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        from frugal.core.policy import policy_option_names

        unknown = sorted(set(self.policy_options) - set(policy_option_names(self.policy)))
        if unknown:
            raise ConfigError(f"scheduling policy {self.policy!r} has no option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(policy_option_names(self.policy)) or 'none'}")
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
    # Weight-only INT4/INT8 (frugal.quant); None runs a 16-bit checkpoint as is, or a checkpoint written
    # by `frugal quantize` with its own settings.
    quant: QuantConfig | None = None
    # Speculative decoding (frugal.spec); None decodes one token per step.
    speculative: "SpecConfig | None" = None


_SPEC_METHODS = ("ngram", "draft")
_SPEC_PLANNED = ("tree", "medusa")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (frugal.spec). `method`: 'ngram' (prompt lookup, n-grams of `ngram_min`..
    `ngram_max` tokens) or 'draft' (a small model at `model` sharing the target's vocabulary).
    `num_speculative_tokens` is k, the longest chain proposed per step; with `adaptive` each request's
    k shrinks (down to 0, with periodic re-probes) while its acceptance is low."""

    method: str
    model: str | None = None
    num_speculative_tokens: int = 5
    ngram_max: int = 3
    ngram_min: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method in _SPEC_PLANNED:
            raise ConfigError(f"speculative method {self.method!r} is not implemented yet; use one of "
                              f"{', '.join(_SPEC_METHODS)}")
        if self.method not in _SPEC_METHODS:
            raise ConfigError(f"unknown speculative method {self.method!r}; use one of {', '.join(_SPEC_METHODS)}")
        if self.method == "draft" and not self.model:
            raise ConfigError("speculative 'draft' needs a draft model directory: 'draft:DIR,k=5'")
        if self.method == "ngram" and self.model:
            raise ConfigError("speculative 'ngram' takes no model")
        for name in ("num_speculative_tokens", "ngram_max", "ngram_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"speculative {name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > 32:
            raise ConfigError(f"speculative k={self.num_speculative_tokens} is too long (at most 32)")
        if self.ngram_min > self.ngram_max:
            raise ConfigError(f"speculative min_n={self.ngram_min} exceeds n={self.ngram_max}")

    @classmethod
    def parse(cls, spec: "str | SpecConfig | None") -> "SpecConfig | None":
        """'draft:DIR,k=5' | 'ngram:n=3,k=5' | 'ngram' (options: k, n, min_n, adaptive=0/1) -> SpecConfig."""
        if spec is None or isinstance(spec, SpecConfig):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"speculative must be a string like 'ngram:n=3,k=5' or 'draft:DIR,k=5', got {spec!r}")
        method, _, rest = spec.strip().partition(":")
        fields: dict = {"method": method.strip()}
        keys = {"k": "num_speculative_tokens", "n": "ngram_max", "min_n": "ngram_min", "adaptive": "adaptive"}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                if "model" in fields:
                    raise ConfigError(f"speculative {spec!r}: two model paths ({fields['model']!r}, {part!r})")
                fields["model"] = part
                continue
            if key.strip() not in keys:
                raise ConfigError(f"speculative {spec!r}: unknown option {key.strip()!r}; known: {', '.join(keys)}")
            name = keys[key.strip()]
            if name == "adaptive":
                if value.strip().lower() not in ("0", "1", "true", "false", "on", "off"):
                    raise ConfigError(f"speculative adaptive must be on/off, got {value!r}")
                fields[name] = value.strip().lower() in ("1", "true", "on")
                continue
            try:
                fields[name] = int(value)
            except ValueError:
                raise ConfigError(f"speculative {spec!r}: {key.strip()} must be an integer, got {value!r}") from None
        return cls(**fields)
