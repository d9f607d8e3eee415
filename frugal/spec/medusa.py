"""Medusa heads (Medusa-1, Cai et al. 2024): extra decoding heads on the target's final hidden state.

The base LM head maps the final hidden state h_t (after the last norm) to the next token t+1. Head k
(k = 1..K) maps the same h_t to token t+1+k:

    logits_k(h) = LM_k(ResBlock_k^L(h)),   ResBlock(x) = x + SiLU(W x + b)

W and b start at zero, so an untrained head is the identity followed by its LM projection.

Deviation from Medusa-1, for size: by default every head SHARES the frozen base LM head
(`shared_lm_head`), so only the residual blocks are trained and stored (K x L x (H^2 + H)
parameters: 0.6M for K=4 on a 384-wide model instead of 13M with per-head vocabulary projections).
`shared_lm_head=False` gives each head its own projection (Medusa-1's layout), initialised from
the base LM head by the trainer.

On disk (next to the model by default): `medusa_heads.safetensors` (float32 tensors named
`blocks.{k}.{l}.linear.{weight,bias}` and, unshared, `lm_heads.{k}.weight`) and
`medusa_config.json` (shape, the base model's identity, training statistics).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frugal.errors import ConfigError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"
FORMAT = "frugal-medusa-1"
# A fixed pseudo-random probe of the base LM head: the trainer stores the top tokens of
# lm_head(probe); the engine recomputes them to warn when heads meet another base model.
_PROBE_SEED, _PROBE_TOP = 1234, 8

BaseLMHead = Callable[[torch.Tensor], torch.Tensor]   # hidden [n, H] -> logits [n, V]


@dataclass(frozen=True)
class MedusaConfig:
    """What `medusa_config.json` holds. `rank_accuracy[k][r]`: on held-out text, the fraction of
    positions where head k+1's rank-r token equals the base model's argmax k+1 positions later
    (what greedy verification accepts); the proposer's default tree is built from it."""

    num_heads: int
    hidden_size: int
    vocab_size: int
    num_layers: int = 1
    shared_lm_head: bool = True
    base_model: dict[str, Any] = field(default_factory=dict)
    rank_accuracy: list[list[float]] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        for name in ("num_heads", "hidden_size", "vocab_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"medusa config: {name} must be a positive integer, got {value!r}")
        if self.format != FORMAT:
            raise ConfigError(f"medusa config: format {self.format!r} is not {FORMAT!r}")


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b zero-initialised (an identity at the start)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads. `forward(hidden, base_lm_head)` -> logits [K, n, V] for hidden [n, H]; with a shared
    LM head `base_lm_head` (the target's `compute_logits`, or the trainer's frozen nn.Linear) is
    applied to each head's residual output, otherwise it is not used."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(config.hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads))
        self.lm_heads = None if config.shared_lm_head else nn.ModuleList(
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def head_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] (or [..., H]) -> each head's residual output [K, n, H] (float32)."""
        x = hidden.float()
        return torch.stack([block(x) for block in self.blocks])

    def forward(self, hidden: torch.Tensor, base_lm_head: BaseLMHead | None = None) -> torch.Tensor:
        states = self.head_states(hidden)  # [K, ..., H]
        if self.lm_heads is not None:
            return torch.stack([head(states[k]) for k, head in enumerate(self.lm_heads)]).float()
        if base_lm_head is None:
            raise ValueError("medusa heads share the base LM head: pass base_lm_head")
        # One pass over the (large) LM head for all heads: [K * n, H] -> [K * n, V].
        flat = states.reshape(-1, states.shape[-1])
        return base_lm_head(flat).float().reshape(*states.shape[:-1], -1)  # [K, ..., V]


def probe_tokens(base_lm_head: BaseLMHead, hidden_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> list[int]:
    """The top tokens of the base LM head on a fixed pseudo-random unit-RMS hidden state."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    probe = torch.randn(1, hidden_size, generator=generator)  # [1, H]
    with torch.no_grad():
        logits = base_lm_head(probe.to(device=device, dtype=dtype)).float()[0]  # [V]
    return logits.topk(_PROBE_TOP).indices.tolist()


def save_medusa(heads: MedusaHeads, out_dir: Path | str) -> Path:
    """Write the heads' weights and config into `out_dir` (temporary names, then renamed)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in heads.state_dict().items()}
    tmp_weights, tmp_config = out_dir / f".{WEIGHTS_FILE}.tmp", out_dir / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    tmp_config.write_text(json.dumps(asdict(heads.config), indent=2) + "\n")
    os.chmod(tmp_weights, 0o644)
    os.replace(tmp_weights, out_dir / WEIGHTS_FILE)
    os.replace(tmp_config, out_dir / CONFIG_FILE)
    return out_dir


def read_medusa_config(model_dir: Path | str) -> MedusaConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no Medusa heads in {model_dir}: {CONFIG_FILE} is missing "
                          f"(train them with `frugal train medusa --model MODEL --data FILES`)")
    try:
        raw = json.loads(path.read_text())
        return MedusaConfig(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def load_medusa(model_dir: Path | str, *, hidden_size: int | None = None, vocab_size: int | None = None,
                device: torch.device | str = "cpu") -> MedusaHeads:
    """Load heads saved by `save_medusa`. `hidden_size`/`vocab_size`: the target's, checked against
    the heads' (ConfigError on a mismatch)."""
    from safetensors.torch import load_file

    config = read_medusa_config(model_dir)
    for name, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if want is not None and getattr(config, name) != want:
            raise ConfigError(f"Medusa heads in {model_dir} have {name} {getattr(config, name)}, the target {want}: "
                              f"they were trained for another model")
    heads = MedusaHeads(config)
    weights_path = Path(model_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ConfigError(f"Medusa heads in {model_dir}: {WEIGHTS_FILE} is missing")
    state = load_file(str(weights_path))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights_path} does not match {CONFIG_FILE}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return heads.to(device).eval().requires_grad_(False)


def check_base_identity(config: MedusaConfig, base_lm_head: BaseLMHead, dtype: torch.dtype,
                        device: torch.device | str, source: str) -> bool:
    """Warn (and return False) when the target's LM head disagrees with the one the heads were
    trained on. Matters only for shared heads; speculation stays lossless either way."""
    stored = config.base_model.get("probe_top_tokens")
    if not config.shared_lm_head or not stored:
        return True
    now = probe_tokens(base_lm_head, config.hidden_size, dtype, device)
    overlap = len(set(now) & set(stored))
    if overlap < len(stored) // 2:
        logger.warning("Medusa heads in %s were trained on another base model (LM head probe overlap %d/%d); "
                       "expect few accepted candidates", source, overlap, len(stored))
        return False
    return True
