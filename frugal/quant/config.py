"""QuantConfig: which weights are quantized and how — validated once, stored in a checkpoint's
`config.json` under `quantization_config`, never mutated.

- `bits=4`: INT4 group-wise, `group_size` in {32, 64, 128} input features per scale, `scheme` 'sym'
  (q in -8..7, like llama.cpp's Q4_0) or 'asym' (q in 0..15 with a per-group zero point).
- `bits=8`: INT8 per output channel, symmetric (q in -127..127); `group_size` and `scheme` do not apply.
- `embedding_bits` / `lm_head_bits`: 16 keeps those tensors in the model dtype, 8 stores them INT8
  per row, 4 (with bits=4, not for a tied pair) INT4 with the layers' group size and scheme. A tied
  embedding/head is one tensor and follows `lm_head_bits`.
- `method`: how the decoder weights were rounded: 'rtn' (round to nearest, what quantizing at load
  does) or 'gptq' (error-compensating calibration, Frantar et al. 2022; `frugal quantize --method gptq`).

This module imports nothing heavy so that `frugal.config` can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from frugal.errors import ConfigError

QUANT_METHOD_NAME = "frugal"  # `quant_method` in config.json
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int | None = 32
    scheme: str = "sym"
    embedding_bits: int = 8
    lm_head_bits: int = 8
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits!r}")
        if self.bits == 4:
            if self.group_size not in (32, 64, 128):
                raise ConfigError(f"INT4 group_size must be 32, 64 or 128, got {self.group_size!r}")
            if self.scheme not in ("sym", "asym"):
                raise ConfigError(f"INT4 scheme must be 'sym' or 'asym', got {self.scheme!r}")
        else:
            if self.group_size is not None:
                raise ConfigError(f"INT8 is per output channel; group_size must be unset, got {self.group_size!r}")
            if self.scheme != "sym":
                raise ConfigError(f"INT8 is symmetric; scheme must be 'sym', got {self.scheme!r}")
        for name in ("embedding_bits", "lm_head_bits"):
            if getattr(self, name) not in (4, 8, 16):
                raise ConfigError(f"{name} must be 4, 8 or 16, got {getattr(self, name)!r}")
            if getattr(self, name) == 4 and self.bits != 4:
                raise ConfigError(f"{name}=4 needs bits=4 (it uses the layers' group size and scheme)")
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"quantization method must be 'rtn' or 'gptq', got {self.method!r}")

    @classmethod
    def create(cls, value: QuantConfig | str | None, **overrides: Any) -> QuantConfig | None:
        """None / 'none' -> None; 'int4' / 'int8' -> defaults for those bits; a QuantConfig as is."""
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if overrides:
                raise ConfigError(f"quantization options {sorted(overrides)} given without quantization")
            return None
        if isinstance(value, QuantConfig):
            return replace(value, **overrides) if overrides else value
        if isinstance(value, str) and value.lower() in ("int4", "int8"):
            bits = int(value[3:])
            defaults: dict[str, Any] = {"bits": bits, "group_size": 32 if bits == 4 else None}
            return cls(**{**defaults, **overrides})
        raise ConfigError(f"quantization must be None, 'int4', 'int8' or a QuantConfig, got {value!r}")

    @property
    def name(self) -> str:
        """Short label: int4-g32-sym, int8, ... (method and embedding/head bits appended when not default)."""
        label = f"int4-g{self.group_size}-{self.scheme}" if self.bits == 4 else "int8"
        if self.method != "rtn":
            label += f"-{self.method}"
        if (self.embedding_bits, self.lm_head_bits) != (8, 8):
            label += f"-emb{self.embedding_bits}-head{self.lm_head_bits}"
        return label

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD_NAME, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> QuantConfig:
        """Parse a checkpoint's `quantization_config`; raises ConfigError for anything not ours."""
        if not isinstance(data, dict):
            raise ConfigError(f"quantization_config must be an object, got {type(data).__name__}")
        method = data.get("quant_method")
        if method != QUANT_METHOD_NAME:
            raise ConfigError(f"checkpoint is quantized with {method!r}; frugal loads only its own "
                              f"'{QUANT_METHOD_NAME}' format (re-quantize the 16-bit model with `frugal quantize`)")
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"unsupported frugal quantization format_version {data.get('format_version')!r}")
        fields = {k: data[k] for k in ("bits", "group_size", "scheme", "embedding_bits", "lm_head_bits", "method")
                  if k in data}
        return cls(**fields)
