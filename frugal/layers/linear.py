"""Linear layers with a pluggable weight representation (the `QuantMethod` seam).

A linear layer owns its shapes and how checkpoint shards map onto its output rows; a `LinearMethod`
owns how the weight is stored and multiplied. `UnquantizedLinearMethod` keeps a dense
`weight [output_size, input_size]`; a quantised method (INT4/INT8, a later issue) registers packed
tensors in `create_weights` and dequantises or calls a kernel in `apply`. The method is chosen at
construction; `forward` never branches on it.

Merged projections (vLLM style):
- `QKVLinear`: `qkv_proj` rows are [q (num_heads * head_dim) | k (num_kv_heads * head_dim) | v (same)],
  loaded from q/k/v_proj with shard ids "q", "k", "v" (weights and biases).
- `MergedColumnLinear`: rows are the concatenation of `output_sizes`, loaded with shard ids 0, 1, ...
  (gate_up_proj = [gate | up]).

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute; loaders
check shapes and raise ModelLoadError naming the parameter and both shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugal.errors import ModelLoadError


@dataclass(frozen=True)
class NativeLinearSpec:
    """How the C++ decode step (frugal.runner.native_decode) calls a layer's kernel: `kind` names the
    kernel (int4_x16, int4, int8_x16, int8, bf16: frugal's CPU kernels; dense: F.linear) and the rest
    are the arguments `apply` passes it, so both paths compute the same thing."""

    kind: str
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0
    max_rows: int = 0


class LinearMethod(ABC):
    """How a linear layer stores and applies its weight (`QuantMethod` on every Linear)."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        """Register the weight parameter(s) on `layer`, each with a `weight_loader` attribute taken from
        `layer.weight_loader` (or a method-specific one)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [num_tokens, input_size] -> [num_tokens, output_size]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Hook called once after all weights are loaded (repacking, transposing, ...)."""

    def native_spec(self, layer: nn.Module) -> NativeLinearSpec | None:
        """The kernel call `apply` makes, for the C++ decode step; None: only `apply` can run it."""
        return None


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)  # [output_size, input_size]
        weight.weight_loader = layer.weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def native_spec(self, layer: nn.Module) -> NativeLinearSpec | None:
        return NativeLinearSpec("dense", layer.weight)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """param.copy_(loaded) after a shape check; dtype/device conversion is done by copy_."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ModelLoadError(
            f"unexpected shape for {what}: checkpoint has {tuple(loaded.shape)}, model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


class LinearBase(nn.Module):
    """y = x W^T + b with W split into row shards `output_sizes` (one shard for a plain linear)."""

    # Shard id -> index into output_sizes; overridden by subclasses with named shards.
    shard_ids: tuple = (None,)

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False,
        linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        params_dtype = params_dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, self.output_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=params_dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def shard_rows(self, shard_id) -> tuple[int, int]:
        """-> (row offset, row count) of shard `shard_id` in the output dimension."""
        index = self.shard_ids.index(shard_id)
        return sum(self.output_sizes[:index]), self.output_sizes[index]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy a checkpoint tensor (a whole weight/bias, or shard `shard_id` of it) into `param`."""
        if shard_id not in self.shard_ids:
            raise ModelLoadError(f"{type(self).__name__} has no shard {shard_id!r}; shards: {self.shard_ids}")
        offset, size = self.shard_rows(shard_id)
        target = param if len(self.shard_ids) == 1 else param.narrow(0, offset, size)
        copy_checked(target, loaded, f"shard {shard_id!r} of {type(self).__name__}" if shard_id is not None
                     else type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}"


class Linear(LinearBase):
    """A plain (unmerged) projection, e.g. o_proj, down_proj."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, [output_size], bias, linear_method, params_dtype)


class MergedColumnLinear(LinearBase):
    """Several projections of the same input stacked by rows; shard ids 0..len(output_sizes)-1."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, output_sizes, bias, linear_method, params_dtype)


class QKVLinear(LinearBase):
    """Fused q/k/v projection; `split(out)` -> (q [n, H*D], k [n, Hkv*D], v [n, Hkv*D])."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias, linear_method, params_dtype)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
