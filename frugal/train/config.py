"""Training configuration: one TOML file (`[model]`, `[data]`, `[optim]`), validated once at the edge.

`TrainConfig.from_toml` rejects unknown keys and wrongly typed values with a ConfigError naming the
file, the table and the key, so a typo never silently trains the wrong model. Relative paths in
`[data]` are resolved against the config file's directory; command-line overrides (`--data`,
`--tokenizer`, ...) are applied with `TrainConfig.replace_*` and are relative to the working directory.
After construction a TrainConfig is frozen: the trainer, the data pipeline and the exporter each read
their own slice and never change it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from frugal.errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
ACTIVATIONS = ("silu", "relu", "gelu")
AUTOCAST_DTYPES = ("float32", "bfloat16", "float16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """The decoder's shape. `architecture = "llama"` is HF LlamaForCausalLM (`hidden_act = "relu"` makes
    its gated MLP ReGLU, relu(gate) * up, as ReluLLaMA); "mixtral" is HF MixtralForCausalLM with
    `num_local_experts` experts of `intermediate_size`, `num_experts_per_tok` routed per token."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    architecture: str = "llama"
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"model.hidden_act must be one of {', '.join(ACTIVATIONS)}; got {self.hidden_act!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "num_local_experts", "num_experts_per_tok"):
            _require_positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"model.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_local_experts ({self.num_local_experts})")

    @property
    def hf_architecture(self) -> str:
        return ARCHITECTURES[self.architecture]


@dataclass(frozen=True)
class DataSpec:
    """Training text and how it is cut. `files`: files, directories (every file below them except
    README*) or glob patterns. `tokenizer`: a directory holding tokenizer.json (+ tokenizer_config.json).
    Every `val_every`-th block of `val_block_tokens` tokens of the token stream is validation, never
    trained on."""

    files: tuple[str, ...]
    tokenizer: str
    seq_len: int = 256
    val_every: int = 50
    val_block_tokens: int = 16384

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError("data.files is empty: name at least one training file")
        _require_positive("data.seq_len", self.seq_len)
        if self.val_every < 2:
            raise ConfigError(f"data.val_every must be >= 2 (one block in val_every is validation), got {self.val_every}")
        if self.val_block_tokens <= self.seq_len:
            raise ConfigError(f"data.val_block_tokens ({self.val_block_tokens}) must exceed data.seq_len ({self.seq_len})")


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with linear warmup then cosine decay from `lr` to `min_lr` at `max_steps`. One step is
    `grad_accum_steps` micro-batches of `batch_size` sequences. `autocast_dtype` is the forward/backward
    compute dtype (master weights stay float32); `save_dtype` the exported checkpoint's."""

    max_steps: int
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    autocast_dtype: str = "bfloat16"
    save_dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every"):
            _require_positive(f"optim.{name}", getattr(self, name))
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in (0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"optim.autocast_dtype must be one of {', '.join(AUTOCAST_DTYPES)}; got {self.autocast_dtype!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"optim.save_dtype must be one of {', '.join(SAVE_DTYPES)}; got {self.save_dtype!r}")

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step (times data.seq_len: tokens per step)."""
        return self.batch_size * self.grad_accum_steps


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec
    source: str = field(default="<dict>", compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None, source: str = "<dict>") -> TrainConfig:
        """Build from a parsed TOML document; relative data paths are resolved against `base_dir`."""
        unknown = set(raw) - {"model", "data", "optim"}
        if unknown:
            raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)}; expected [model], [data], [optim]")
        for table in ("model", "data", "optim"):
            if not isinstance(raw.get(table), dict):
                raise ConfigError(f"{source}: missing [{table}] table")
        data = dict(raw["data"])
        if base_dir is not None:
            if isinstance(data.get("files"), list):
                data["files"] = [_resolve(base_dir, p) for p in data["files"]]
            if isinstance(data.get("tokenizer"), str):
                data["tokenizer"] = _resolve(base_dir, data["tokenizer"])
        return cls(model=_build(ModelSpec, raw["model"], "model", source),
                   data=_build(DataSpec, data, "data", source),
                   optim=_build(OptimSpec, raw["optim"], "optim", source), source=source)

    @classmethod
    def from_toml(cls, path: Path | str) -> TrainConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"training config {path} not found") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from exc
        return cls.from_dict(raw, base_dir=path.resolve().parent, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out["data"]["files"] = list(out["data"]["files"])
        return out

    def with_data(self, files: list[str] | None = None, tokenizer: str | None = None) -> TrainConfig:
        data = self.data
        if files:
            data = dataclasses.replace(data, files=tuple(str(Path(f)) for f in files))
        if tokenizer:
            data = dataclasses.replace(data, tokenizer=str(Path(tokenizer)))
        return dataclasses.replace(self, data=data)

    def with_optim(self, **overrides: Any) -> TrainConfig:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, **overrides)) if overrides else self


def _resolve(base_dir: Path, path: Any) -> Any:
    if not isinstance(path, str):
        return path  # the type check in _build reports it
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base_dir / p)


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _build(cls, table: dict[str, Any], section: str, source: str):
    """Instantiate dataclass `cls` from a TOML table, checking key names and value types."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [{section}]: {sorted(unknown)}; "
                          f"known: {sorted(fields)}")
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in table]
    if missing:
        raise ConfigError(f"{source}: [{section}] is missing required key(s) {missing}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        expected = hints[name]
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif expected is str:
            ok = isinstance(value, str)
        else:  # tuple[str, ...]
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        if not ok:
            raise ConfigError(f"{source}: [{section}] {name} = {value!r} has the wrong type "
                              f"(expected {getattr(expected, '__name__', str(expected))})")
        values[name] = value
    return cls(**values)
