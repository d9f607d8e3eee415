"""The quantization plan: which LinearMethod each layer gets, and how a 16-bit checkpoint's tensor
stream becomes the quantized one.

A quantized layer stores canonical tensors (`qweight`, `scales`, optional `qzeros`) registered as
parameters by `QuantizedLinearMethod.create_weights`, each row-shardable by the layer's own
`weight_loader` (so q/k/v and gate/up still load into the fused projections). Two ways in:

- a 16-bit checkpoint with `quantization=...`: `quantize_stream` rounds each weight as it streams off
  the memory-mapped file, so peak memory is the quantized model plus one 16-bit tensor;
- a checkpoint written by `frugal quantize`: its `config.json` carries `quantization_config` and the
  tensors are loaded as they are.

Both go through `quantize_stream`'s naming (`<weight name minus .weight>.qweight|scales|qzeros`), so a
checkpoint written by `frugal quantize` loads bit-identically to quantizing at load.
Quantized: every 2-D `.weight` inside `model.layers.*` (the projections) except MoE routers, and the
embedding / LM head when their bits are 8. A tied embedding/head is one tensor and follows `lm_head_bits`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frugal.errors import ConfigError, ModelLoadError
from frugal.layers.embedding import EmbeddingMethod
from frugal.layers.linear import LinearMethod
from frugal.quant.config import QuantConfig

logger = logging.getLogger(__name__)

EMBEDDING_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class QuantizedLinearMethod(LinearMethod):
    """Registers the tensors of `tensor_specs` on the layer. Their dtypes are part of the format, so the
    parameters carry `keep_dtype = True` (the loader never casts them to the model dtype)."""

    def tensor_specs(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        for name, spec in self.tensor_specs(input_size, sum(output_sizes)).items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.weight_loader = layer.weight_loader
            param.keep_dtype = True
            layer.register_parameter(name, param)

    def canonical(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's tensors in the checkpoint layout (undoing any kernel repacking)."""
        raise NotImplementedError


def check_tied_head_bits(config: QuantConfig, tied: bool) -> None:
    if tied and config.lm_head_bits == 4:
        raise ConfigError("an INT4 LM head tied to the embedding is not supported (its lookups would read the "
                          "kernel layout); use lm_head_bits 8 or 16")


REPACK_ROWS_PER_CHUNK = 4096  # a multiple of every kernel layout's row tile (4, 16)


def repack_in_row_chunks(tensors: list[torch.Tensor | None], repack, rows_per_chunk: int = REPACK_ROWS_PER_CHUNK) -> None:
    """Apply a row-tiled layout change in place, a chunk of rows at a time: tiles never straddle chunks,
    and a tile occupies the same bytes as its rows did, so the result equals repacking the whole tensor while
    the temporaries stay at one chunk (an LM head's 32000-row table would otherwise peak at ~3x its size).
    `repack(*chunks) -> new chunks` (None entries pass through)."""
    rows = tensors[0].shape[0]
    with torch.no_grad():
        for start in range(0, rows, rows_per_chunk):
            end = min(rows, start + rows_per_chunk)
            chunks = [None if t is None else t[start:end] for t in tensors]
            for chunk, new in zip(chunks, repack(*chunks)):
                if chunk is not None:
                    chunk.copy_(new)


@dataclass(frozen=True)
class QuantMethods:
    """What `load_model` hands the model: one method per role (None = the model's default)."""

    linear: LinearMethod | None = None
    lm_head: LinearMethod | None = None
    embedding: EmbeddingMethod | None = None


def select_backend(device: torch.device | str) -> str:
    """'cpu' when our kernels are built, 'cuda' on a GPU, else 'reference'."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu":
        from frugal.quant.kernels import cpu_kernels

        if cpu_kernels() is not None:
            return "cpu"
    return "reference"


def build_quant_methods(config: QuantConfig | None, dtype: torch.dtype, device: torch.device | str,
                        tied: bool, backend: str | None = None, quant_activations: str = "exact") -> QuantMethods:
    """The methods for `config` (None: 16-bit, with our streaming bf16 kernel on CPU where it applies).
    `backend` forces 'cpu' / 'cuda' / 'reference' (tests use 'reference' as the oracle);
    `quant_activations` 'int8' picks the VNNI kernels for INT4/INT8 on CPU (see Int4LinearMethod)."""
    from frugal.quant.dense import CpuDenseLinearMethod
    from frugal.quant.int4 import Int4EmbeddingMethod, Int4LinearMethod
    from frugal.quant.int8 import Int8EmbeddingMethod, Int8LinearMethod

    if backend is None:
        backend = select_backend(device)
        if backend != "cpu":  # rounding activations only pays on the VNNI kernels; elsewhere it is just slower
            quant_activations = "exact"
    dense = CpuDenseLinearMethod() if backend == "cpu" and dtype == torch.bfloat16 else None
    if config is None:
        return QuantMethods(linear=dense, lm_head=dense)
    if config.bits == 4:
        linear = Int4LinearMethod(config.group_size, config.scheme, backend, activations=quant_activations)
    else:
        linear = Int8LinearMethod(backend, activations=quant_activations)
    check_tied_head_bits(config, tied)
    if config.lm_head_bits == 4:
        lm_head = Int4LinearMethod(config.group_size, config.scheme, backend, activations=quant_activations)
    else:
        lm_head = Int8LinearMethod(backend, activations=quant_activations) if config.lm_head_bits == 8 else dense
    embedding_bits = config.lm_head_bits if tied else config.embedding_bits
    embedding = (Int8EmbeddingMethod(dtype) if embedding_bits == 8
                 else Int4EmbeddingMethod(config.group_size, config.scheme, dtype) if embedding_bits == 4 else None)
    return QuantMethods(linear=linear, lm_head=lm_head, embedding=embedding)


# ---- checkpoints ---------------------------------------------------------------------------------

def read_quant_config(model_dir: Path | str) -> QuantConfig | None:
    """The checkpoint's own `quantization_config` (None for a 16-bit checkpoint)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read config.json ({type(exc).__name__}: {exc})") from exc
    data = raw.get("quantization_config") if isinstance(raw, dict) else None
    if data is None:
        return None
    try:
        return QuantConfig.from_json(data)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def resolve_quantization(requested: QuantConfig | None, model_dir: Path | str) -> tuple[QuantConfig | None, bool]:
    """-> (the config to run with, whether the checkpoint is already quantized). A quantized
    checkpoint runs as it was written; asking for different settings is a ConfigError."""
    stored = read_quant_config(model_dir)
    if stored is None:
        return requested, False
    if requested is not None and (requested.bits, requested.group_size, requested.scheme) != (
            stored.bits, stored.group_size, stored.scheme):
        raise ConfigError(f"{model_dir} is already quantized as {stored.name}; it cannot be re-quantized as "
                          f"{requested.name} (pass quantization=None, or quantize the 16-bit checkpoint)")
    return stored, True


def is_moe_router(name: str) -> bool:
    """A mixture-of-experts router (`...block_sparse_moe.gate.weight`): kept 16-bit, as llama.cpp does,
    since rounding it flips discrete expert choices; it is tiny ([num_experts, hidden])."""
    return name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight"))


def is_decoder_linear(name: str, tensor: torch.Tensor) -> bool:
    return (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
            and not is_moe_router(name))


def quantize_tensor(name: str, tensor: torch.Tensor, config: QuantConfig, tied: bool,
                    precomputed: dict[str, dict[str, torch.Tensor]] | None = None
                    ) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> the tensors the quantized model loads in its place (possibly none:
    a tied checkpoint's duplicate lm_head). `precomputed` maps a weight name to canonical tensors
    made elsewhere (GPTQ)."""
    from frugal.quant.int4 import quantize_int4
    from frugal.quant.int8 import quantize_int8

    if name == LM_HEAD_NAME and tied:
        return []
    stem = name[: -len(".weight")]
    if precomputed and name in precomputed:
        return [(f"{stem}.{k}", v) for k, v in precomputed[name].items()]
    if is_decoder_linear(name, tensor):
        if config.bits == 4:
            tensors = quantize_int4(tensor, config.group_size, config.scheme).tensors()
        else:
            tensors = quantize_int8(tensor).tensors()
        return [(f"{stem}.{k}", v) for k, v in tensors.items()]
    head_bits = config.lm_head_bits
    bits = head_bits if name == LM_HEAD_NAME else (head_bits if tied else config.embedding_bits)
    if name in (LM_HEAD_NAME, EMBEDDING_NAME) and bits == 8:
        return [(f"{stem}.{k}", v) for k, v in quantize_int8(tensor).tensors().items()]
    if name in (LM_HEAD_NAME, EMBEDDING_NAME) and bits == 4:
        tensors = quantize_int4(tensor, config.group_size, config.scheme).tensors()
        return [(f"{stem}.{k}", v) for k, v in tensors.items()]
    return [(name, tensor)]


def quantize_stream(weights: Iterable[tuple[str, torch.Tensor]], config: QuantConfig, tied: bool,
                    precomputed: dict[str, dict[str, torch.Tensor]] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize a (name, 16-bit tensor) stream one tensor at a time."""
    check_tied_head_bits(config, tied)  # before any tensor is written
    for name, tensor in weights:
        yield from quantize_tensor(name, tensor, config, tied, precomputed)
