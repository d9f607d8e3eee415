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
    # torch.compile the CPU decode step (frugal.runner.compiled_decode); off by default: the first
    # decode step then compiles for about a minute (cached on disk afterwards).
    compile: bool = False
    # Run CPU decode-only steps as one C++ call (frugal.runner.native_decode) when the model qualifies; same
    # output as eager, much less Python per token. `compile=True` takes precedence.
    native_decode: bool = True
    # How INT4/INT8 weights meet activations on CPU: 'int8' rounds activations to INT8 per block of 32 and
    # multiplies with AVX512-VNNI (llama.cpp's Q4_0/Q8_0 x Q8_0 scheme; the fast path), 'exact' keeps them
    # in the model dtype (the dequantize-then-matmul oracle's numerics). CPUs without VNNI run 'exact'.
    quant_activations: str = "int8"

    def __post_init__(self) -> None:
        if self.quant_activations not in ("int8", "exact"):
            raise ConfigError(f"quant_activations must be 'int8' or 'exact', got {self.quant_activations!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        if not isinstance(self.native_decode, bool):
            raise ConfigError(f"native_decode must be True or False, got {self.native_decode!r}")
        if self.compile and self.device != "cpu":
            raise ConfigError(f"compile applies to the CPU decode path; device is {self.device!r}")
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


_SPEC_METHODS = ("ngram", "draft", "tree", "medusa")
_SPEC_PLANNED: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (frugal.spec). `method`: 'ngram' (prompt lookup, n-grams of `ngram_min`..
    `ngram_max` tokens) or 'draft' (a small model at `model` sharing the target's vocabulary).
    `num_speculative_tokens` is k, the longest chain proposed per step; with `adaptive` each request's
    k shrinks (down to 0, with periodic re-probes) while its acceptance is low.

    'tree' (LLMCad, spec/tree_draft.py): a draft model at `model` grows a token tree at most k deep
    and `tree_nodes` candidates large, giving `tree_width` children to nodes whose draft runner-up is
    at least `tree_branch` times as likely as the best token, and stops when the path's accumulated
    uncertainty (nats) exceeds a per-request threshold starting at `tree_threshold` (self-adjusting
    when `adaptive`); with `tree_overlap` it drafts the next tree while the target verifies.

    'medusa' (Medusa-1, spec/medusa.py): heads trained by `frugal train medusa`, saved in `model`,
    propose a fixed sparse tree of `tree_nodes` candidates at most k deep from each head's
    `medusa_top_k` best tokens. `typical` replaces lossless verification of sampled requests by
    Medusa's typical acceptance (p(x) > min(`typical_epsilon`, `typical_delta` * exp(-entropy))):
    LOSSY, opt-in; greedy requests stay exact."""

    method: str
    model: str | None = None
    num_speculative_tokens: int = 5
    ngram_max: int = 3
    ngram_min: int = 1
    adaptive: bool = True
    tree_nodes: int = 12
    tree_width: int = 2
    tree_branch: float = 0.5
    tree_threshold: float = 4.0
    tree_overlap: bool = False
    medusa_top_k: int = 4
    typical: bool = False
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3

    def __post_init__(self) -> None:
        if self.method in _SPEC_PLANNED:
            raise ConfigError(f"speculative method {self.method!r} is not implemented yet; use one of "
                              f"{', '.join(_SPEC_METHODS)}")
        if self.method not in _SPEC_METHODS:
            raise ConfigError(f"unknown speculative method {self.method!r}; use one of {', '.join(_SPEC_METHODS)}")
        if self.method == "draft" and not self.model:
            raise ConfigError("speculative 'draft' needs a draft model directory: 'draft:DIR,k=5'")
        if self.method == "tree":
            self._check_tree()
        if self.method == "medusa":
            self._check_medusa()
        elif self.typical:
            raise ConfigError(f"speculative typical acceptance is a 'medusa' option, not {self.method!r}'s")
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

    def _check_tree(self) -> None:
        if not self.model:
            raise ConfigError("speculative 'tree' needs a draft model directory: 'tree:DIR,k=5,nodes=12'")
        for name in ("tree_nodes", "tree_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"speculative {name} must be a positive integer, got {value!r}")
        if self.tree_nodes > 64:
            raise ConfigError(f"speculative tree nodes={self.tree_nodes} is too many (at most 64)")
        value = self.tree_branch
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ConfigError(f"speculative tree_branch must be a number in (0, 1), got {value!r}")
        value = self.tree_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 30.0:
            raise ConfigError(f"speculative tree_threshold must be a number of nats in [0, 30], got {value!r}")

    def _check_medusa(self) -> None:
        if not self.model:
            raise ConfigError("speculative 'medusa' needs the directory of its heads: 'medusa:DIR,nodes=12'")
        for name in ("tree_nodes", "medusa_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"speculative {name} must be a positive integer, got {value!r}")
        if self.tree_nodes > 64:
            raise ConfigError(f"speculative medusa nodes={self.tree_nodes} is too many (at most 64)")
        for name in ("typical_epsilon", "typical_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"speculative {name} must be a number in (0, 1], got {value!r}")

    @classmethod
    def parse(cls, spec: "str | SpecConfig | None") -> "SpecConfig | None":
        """'draft:DIR,k=5' | 'ngram:n=3,k=5' | 'ngram' (options: k, n, min_n, adaptive=0/1) |
        'medusa:DIR,k=4,nodes=12,topk=4[,typical=on,eps=0.09,delta=0.3]' -> SpecConfig."""
        if spec is None or isinstance(spec, SpecConfig):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"speculative must be a string like 'ngram:n=3,k=5' or 'draft:DIR,k=5', got {spec!r}")
        method, _, rest = spec.strip().partition(":")
        fields: dict = {"method": method.strip()}
        keys = {"k": "num_speculative_tokens", "n": "ngram_max", "min_n": "ngram_min", "adaptive": "adaptive"}
        if fields["method"] == "tree":  # 'tree:DIR,k=5,nodes=12,width=2,branch=0.6,threshold=0.7,overlap=1'
            keys.update(nodes="tree_nodes", width="tree_width", branch="tree_branch", threshold="tree_threshold",
                        overlap="tree_overlap")
        if fields["method"] == "medusa":  # 'medusa:DIR,k=4,nodes=12,topk=4,typical=on,eps=0.09,delta=0.3'
            keys.update(nodes="tree_nodes", topk="medusa_top_k", typical="typical", eps="typical_epsilon",
                        delta="typical_delta")
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
            if name in ("adaptive", "tree_overlap", "typical"):
                if value.strip().lower() not in ("0", "1", "true", "false", "on", "off"):
                    raise ConfigError(f"speculative {key.strip()} must be on/off, got {value!r}")
                fields[name] = value.strip().lower() in ("1", "true", "on")
                continue
            if name in ("tree_branch", "tree_threshold", "typical_epsilon", "typical_delta"):
                try:
                    fields[name] = float(value)
                except ValueError:
                    raise ConfigError(f"speculative {spec!r}: {key.strip()} must be a number, got {value!r}") from None
                continue
            try:
                fields[name] = int(value)
            except ValueError:
                raise ConfigError(f"speculative {spec!r}: {key.strip()} must be an integer, got {value!r}") from None
        return cls(**fields)
