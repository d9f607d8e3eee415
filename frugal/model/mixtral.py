"""Mixtral: the Llama/Mistral decoder with a sparse mixture-of-experts feed-forward block
(Jiang et al., "Mixtral of Experts", 2024).

Attention, norms, rotary embedding, embedding and LM head are `frugal.model.llama`'s; only the MLP
differs. `MixtralMoE` routes each token to `top_k` of `num_experts` SwiGLU experts, exactly as
transformers' `MixtralSparseMoeBlock`:

    router_logits = x W_gate^T                        [n, E]   (model dtype)
    probs = softmax(router_logits in float32)         [n, E]
    w, e = topk(probs, k); w /= w.sum(-1)             [n, k]   (float32, renormalised over the chosen k)
    y = sum_j w_j * expert_{e_j}(x)                   [n, hidden]

Experts are computed token-grouped: the (token, expert) assignments are sorted by expert, and each
expert that received tokens runs once on exactly those rows (index_select -> gate_up -> act -> down),
weighted and index_add'ed back, experts in ascending order (transformers' order, so the low-precision
sums agree). Experts with no tokens cost nothing. Each expert is a `LlamaMLP` (fused gate_up), so every
LinearMethod (bf16 kernel, INT8, INT4) applies to the experts; the router stays 16-bit when quantized.

Checkpoint layouts loaded:
- per expert (what transformers writes): `model.layers.L.block_sparse_moe.gate.weight` [E, hidden],
  `...block_sparse_moe.experts.X.w1|w3.weight` [inter, hidden] (gate, up), `...w2.weight` [hidden, inter];
- stacked (transformers' in-memory layout, if a checkpoint stores it): `model.layers.L.mlp.gate.weight`,
  `model.layers.L.mlp.experts.gate_up_proj` [E, 2 * inter, hidden] (gate rows first) and
  `model.layers.L.mlp.experts.down_proj` [E, hidden, inter]; split into the per-expert tensors as they
  stream in (and rounded per expert when the model is quantized at load).

Expert load: `model.set_expert_load_recording(True)` makes every MoE layer add its per-expert
(token, expert) assignment counts of each forward pass (warm-up and profiling passes included) to
`layer.mlp.expert_load` (int64 [E], on the CPU); `model.expert_load()` stacks them [layers, E]. Off by
default. (The per-expert counts are read to the host once per layer anyway, to slice the groups.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from frugal.errors import ModelLoadError
from frugal.layers.linear import Linear, LinearMethod
from frugal.model.arch_config import ArchConfig
from frugal.model.llama import LlamaForCausalLM, LlamaMLP
from frugal.quant.base import QuantizedLinearMethod, quantize_tensor

# (our parameter fragment, checkpoint fragment, shard id) inside one expert.
EXPERT_PARAMS = (("gate_up_proj", "w1", 0), ("gate_up_proj", "w3", 1), ("down_proj", "w2", None))
_STACKED_NAME = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(gate_up_proj|down_proj)$")
_NEW_MOE_NAME = re.compile(r"^(model\.layers\.\d+)\.mlp\.")  # transformers' in-memory module name


class MixtralMoE(nn.Module):
    """Sparse MoE feed-forward block: router `gate` (Linear hidden -> E) and `experts` (E LlamaMLPs)."""

    def __init__(self, arch: ArchConfig, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = arch.num_local_experts, arch.num_experts_per_tok
        # The router stays 16-bit under quantization (frugal.quant.base.is_moe_router).
        router_method = None if isinstance(linear_method, QuantizedLinearMethod) else linear_method
        self.gate = Linear(arch.hidden_size, self.num_experts, False, router_method)
        self.experts = nn.ModuleList(LlamaMLP(arch, linear_method) for _ in range(self.num_experts))
        self.record_load = False
        # Plain attribute, not a buffer: built on the CPU even under the loader's meta device.
        self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device="cpu")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden] -> (weights [n, k] float32 summing to 1 per row, expert ids [n, k] int64)."""
        router_logits = self.gate(x)  # [n, E]
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # = softmax(logits.float()), one op
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [n, k]
        weights /= weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if x.shape[0] == 1:
            return self._forward_one(x, weights[0], experts[0])
        flat_experts = experts.flatten()  # [n * k]
        order = torch.argsort(flat_experts, stable=True)  # assignments grouped by expert
        tokens = order // self.top_k  # [n * k] token row of each sorted assignment
        sorted_weights = weights.flatten()[order, None]  # [n * k, 1]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        if self.record_load:
            self.expert_load += torch.tensor(counts, dtype=torch.int64)
        out = torch.zeros_like(x)  # [n, hidden]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            y = self.experts[expert](x.index_select(0, rows))  # [count, hidden]
            out.index_add_(0, rows, (y * sorted_weights[start:start + count]).to(x.dtype))
            start += count
        return out

    def _forward_one(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: x [1, hidden], weights / experts [k]. Same sums in the same (ascending expert)
        order as the grouped path, without its sort / gather / scatter glue."""
        chosen = sorted(zip(experts.tolist(), range(self.top_k)))
        if self.record_load:
            for expert, _ in chosen:
                self.expert_load[expert] += 1
        out = None
        for expert, j in chosen:
            y = (self.experts[expert](x) * weights[j:j + 1]).to(x.dtype)  # float32 product, as grouped [1, hidden]
            out = y if out is None else out + y
        return out


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama-family decoder whose layers' `mlp` is a `MixtralMoE`."""

    def build_mlp(self, arch: ArchConfig, layer_idx: int, linear_method: LinearMethod | None) -> nn.Module:
        if arch.num_local_experts < 1:
            raise ModelLoadError(f"{arch.architecture} needs num_local_experts >= 1")
        return MixtralMoE(arch, linear_method)

    def moe_layers(self) -> list[MixtralMoE]:
        return [layer.mlp for layer in self.model.layers]

    def set_expert_load_recording(self, enabled: bool, reset: bool = True) -> None:
        for moe in self.moe_layers():
            moe.record_load = enabled
            if reset:
                moe.expert_load.zero_()

    def expert_load(self) -> torch.Tensor:
        """Per-layer (token, expert) assignment counts recorded so far, int64 [num_layers, num_experts]."""
        return torch.stack([moe.expert_load for moe in self.moe_layers()])

    # ---- checkpoint names: ours `model.layers.L.mlp.experts.X.gate_up_proj.weight`, theirs
    #      `model.layers.L.block_sparse_moe.experts.X.w1.weight` (+ w3; w2 for down_proj).

    def checkpoint_shards(self, param_name: str) -> list[str]:
        if ".mlp." not in param_name:
            return super().checkpoint_shards(param_name)
        name = param_name.replace(".mlp.", ".block_sparse_moe.")
        shards = [name.replace(f".{ours}.", f".{theirs}.") for ours, theirs, _ in EXPERT_PARAMS
                  if f".{ours}." in name]
        return shards or [name]

    def param_target(self, name: str) -> tuple[str, object]:
        if ".block_sparse_moe." not in name:
            return super().param_target(name)
        name = name.replace(".block_sparse_moe.", ".mlp.", 1)
        for ours, theirs, shard_id in EXPERT_PARAMS:
            if f".{theirs}." in name:
                return name.replace(f".{theirs}.", f".{ours}."), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As LlamaForCausalLM.load_weights, also accepting the stacked expert layout."""
        return super().load_weights(self._unstack_experts(weights))

    def _unstack_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Name every MoE tensor `...block_sparse_moe...` and split stacked expert tensors into per-expert
        checkpoint tensors; pass the rest through."""
        quant = getattr(self, "quant_config", None)
        for name, tensor in weights:
            name = _NEW_MOE_NAME.sub(r"\1.block_sparse_moe.", name, count=1)
            match = _STACKED_NAME.match(name)
            if match is None:
                yield name, tensor
                continue
            prefix, kind = match.groups()
            if tensor.dim() != 3 or tensor.shape[0] != self.arch.num_local_experts:
                raise ModelLoadError(f"weight {name!r}: expected [{self.arch.num_local_experts}, ...] stacked "
                                     f"experts, got {tuple(tensor.shape)}")
            for expert in range(tensor.shape[0]):
                stem = f"{prefix}.block_sparse_moe.experts.{expert}"
                if kind == "down_proj":
                    parts = [(f"{stem}.w2.weight", tensor[expert])]
                else:
                    gate, up = tensor[expert].chunk(2, dim=0)  # [inter, hidden] each
                    parts = [(f"{stem}.w1.weight", gate), (f"{stem}.w3.weight", up)]
                for part_name, part in parts:
                    if quant is None:
                        yield part_name, part
                    else:  # the loader quantizes 2-D weights as they stream; these were 3-D then
                        yield from quantize_tensor(part_name, part.contiguous(), quant, self.arch.tie_word_embeddings)

