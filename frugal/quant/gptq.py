"""GPTQ: error-compensating weight quantization from a few hundred calibration tokens
(Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

For a linear layer with inputs X, GPTQ rounds the weight one input column at a time and pushes each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = 2 X^T X / n, which minimises ||W X - Q X||^2 far better than rounding to nearest. Layers are
processed in order: each decoder layer is calibrated on the outputs of the already-quantized layers
before it ("sequential" GPTQ), its four projections (fused qkv, o, fused gate/up, down) from one
forward pass. Group parameters (scale, zero) are fixed when the loop reaches a group's first column,
from the error-updated weights, exactly as the reference implementation does; they follow the same
rounding rules as round-to-nearest (`frugal.quant.int4` / `int8`), so the output is the canonical
checkpoint format.

Invariants: every weight gets the same tensors `quantize_tensor` would produce in shape and dtype;
only the rounding choices differ. The model's own weights are overwritten with the dequantized values
as it goes (the model is a scratch copy).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from frugal.errors import ConfigError
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.quant.config import QuantConfig
from frugal.quant.int4 import grid_params, pack_int4, round_to_grid

logger = logging.getLogger(__name__)

BLOCK_COLUMNS = 128  # columns updated lazily together (a multiple of every group size)
# (fused parameter prefix, checkpoint projection names in row order)
FUSED_SPLITS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text: `num_samples` windows of `seq_len` tokens drawn (seeded) from `data_file`."""

    data_file: Path
    num_samples: int = 8
    seq_len: int = 128
    damp: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not Path(self.data_file).is_file():
            raise ConfigError(f"calibration data {self.data_file} is not a file")
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ConfigError(f"calibration needs num_samples >= 1 and seq_len >= 2, got "
                              f"{self.num_samples} x {self.seq_len}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"GPTQ damping must be in (0, 1), got {self.damp}")


def calibration_windows(token_ids: list[int], config: CalibrationConfig, bos_token_id: int | None) -> torch.Tensor:
    """-> [num_samples, seq_len] int64 windows of the token stream (each starts with BOS when there is one)."""
    body = config.seq_len - (1 if bos_token_id is not None else 0)
    if len(token_ids) < body + 1:
        raise ConfigError(f"calibration text has {len(token_ids)} tokens, fewer than one window of {config.seq_len}")
    rng = random.Random(config.seed)
    windows = []
    for _ in range(config.num_samples):
        start = rng.randrange(0, len(token_ids) - body)
        window = token_ids[start:start + body]
        windows.append(([bos_token_id] if bos_token_id is not None else []) + window)
    return torch.tensor(windows, dtype=torch.int64)


def prefill_metadata(seq_len: int, block_size: int) -> AttentionMetadata:
    """One request prefilling `seq_len` tokens into blocks 0, 1, ... of a scratch cache."""
    num_blocks = -(-seq_len // block_size)
    return AttentionMetadata(slot_mapping=torch.arange(seq_len), block_tables=torch.arange(num_blocks)[None, :],
                             query_start_loc=[0, seq_len], query_lens=[seq_len], seq_lens=[seq_len],
                             block_size=block_size)


class HessianAccumulator:
    """H = 2/n sum x x^T over the rows x fed to a linear layer (a forward pre-hook)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.num_rows = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()  # [rows, in_features]
        total = self.num_rows + x.shape[0]
        self.hessian.mul_(self.num_rows / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.num_rows = total


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, damp: float
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """weight [N, K], hessian [K, K] -> (canonical tensors, dequantized float32 weight [N, K])."""
    w = weight.float().clone()
    n, k = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    if config.bits == 4:
        group_size = config.group_size
        num_col_groups = -(-k // group_size)
        scales = torch.empty(n, num_col_groups, dtype=torch.float16)
        zeros = torch.empty(n, num_col_groups, dtype=torch.uint8)
    else:
        group_size = k
        row_scales = w.abs().amax(dim=1) / 127.0
        row_scales = torch.where(row_scales == 0, torch.ones_like(row_scales), row_scales)
    q_all = torch.empty(n, k, dtype=torch.float32)
    dequant = torch.empty(n, k, dtype=torch.float32)
    scale_col = zero_col = None
    for i1 in range(0, k, BLOCK_COLUMNS):
        i2 = min(i1 + BLOCK_COLUMNS, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if config.bits == 4 and col % group_size == 0:
                g = col // group_size
                s, z = grid_params(w1[:, i:i + group_size].unsqueeze(1), config.scheme)  # [N, 1]
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                scale_col, zero_col = s[:, 0].float(), z[:, 0].float()
            column = w1[:, i]
            if config.bits == 4:
                q = round_to_grid(column, scale_col, zero_col)
                deq = scale_col * (q - zero_col)
            else:
                q = torch.round(column / row_scales).clamp(-127, 127)
                deq = q * row_scales
            q_all[:, col], dequant[:, col] = q, deq
            err = (column - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if config.bits == 4:
        tensors = pack_int4(q_all, scales, zeros, group_size, config.scheme, k).tensors()
    else:
        tensors = {"qweight": q_all.to(torch.int8), "scales": row_scales.contiguous()}
    return tensors, dequant


def _split_rows(name: str, tensors: dict[str, torch.Tensor], row_sizes: list[int], parts: tuple[str, ...]
                ) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    offsets = [0]
    for size in row_sizes:
        offsets.append(offsets[-1] + size)
    fused = next(f for f in FUSED_SPLITS if f".{f}." in name)
    for part, start, end in zip(parts, offsets, offsets[1:]):
        out[name.replace(fused, part)] = {key: t[start:end].contiguous() for key, t in tensors.items()}
    return out


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, token_windows: torch.Tensor, config: QuantConfig, damp: float,
                        block_size: int = 16, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Calibrate a dense float32 Llama-family `model` on `token_windows [S, T]`; returns
    {checkpoint weight name: canonical tensors} for every decoder projection."""
    decoder = model.model
    arch = model.arch
    num_windows, seq_len = token_windows.shape
    metadata = prefill_metadata(seq_len, block_size)
    kv_cache = torch.zeros(2, metadata.block_tables.shape[1], block_size, arch.num_key_value_heads, arch.head_dim)
    positions = torch.arange(seq_len)
    hidden = [decoder.embed_tokens(token_windows[s]) for s in range(num_windows)]  # each [T, hidden]
    result: dict[str, dict[str, torch.Tensor]] = {}
    layers = list(enumerate(decoder.layers))
    for index, layer in tqdm(layers, desc=f"GPTQ {config.name}", unit="layer", disable=not progress or None):
        linears = {name: module for name, module in layer.named_modules() if hasattr(module, "linear_method")}
        accumulators = {name: HessianAccumulator(module.input_size) for name, module in linears.items()}
        handles = [module.register_forward_pre_hook(accumulators[name]) for name, module in linears.items()]
        try:
            for x in hidden:
                layer(positions, x, None, kv_cache, metadata)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in linears.items():
            tensors, dequant = gptq_quantize_weight(module.weight, accumulators[name].hessian, config, damp)
            module.weight.copy_(dequant.to(module.weight.dtype))
            full_name = f"model.layers.{index}.{name}.weight"
            fused = next((f for f in FUSED_SPLITS if f".{f}." in f".{name}."), None)
            if fused is None:
                result[full_name] = tensors
            else:
                result.update(_split_rows(full_name, tensors, module.output_sizes, FUSED_SPLITS[fused]))
        new_hidden = []
        for x in hidden:  # the next layer sees this layer's quantized outputs
            mlp_out, residual = layer(positions, x, None, kv_cache, metadata)
            new_hidden.append(mlp_out + residual)
        hidden = new_hidden
        del accumulators
    assert all(math.isfinite(float(t["scales"].float().abs().max())) for t in result.values())
    return result
