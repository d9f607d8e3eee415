"""What a training run leaves on disk.

- `OUT/train_state/state.pt`: float32 weights, AdamW moments, the step and counters — everything a
  resumed run needs to continue bit-exactly (batches are a function of the step, see data.py).
- `OUT/`: the Hugging Face checkpoint (`config.json`, `model.safetensors` in `save_dtype`,
  `generation_config.json`, the tokenizer files) and `training.json` (config, counters, losses).

Both are written to a temporary name and renamed into place, so a run killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugal.errors import ConfigError
from frugal.train.tokenizer import TOKENIZER_FILES

logger = logging.getLogger(__name__)

STATE_DIR = "train_state"
STATE_FILE = "state.pt"
SUMMARY_FILE = "training.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sampling defaults written to generation_config.json (frugal and transformers read them).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


@dataclass
class Progress:
    """Counters that advance with training; saved with every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    last_train_loss: float | None = None
    last_val_loss: float | None = None


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR / STATE_FILE


def save_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
               config: dict[str, Any]) -> Path:
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": asdict(progress),
                "config": config}, tmp)
    os.replace(tmp, path)
    return path


def load_state(out_dir: Path) -> dict[str, Any]:
    path = state_path(out_dir)
    if not path.is_file():
        raise ConfigError(f"--resume: no training state at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 — torch raises many kinds for a corrupt file
        raise ConfigError(f"cannot read training state {path} (corrupt?): {exc}") from exc


def export_hf(model: nn.Module, out_dir: Path, tokenizer_dir: Path, save_dtype: str,
              summary: dict[str, Any]) -> None:
    """Write the Hugging Face checkpoint of `model` into `out_dir` (weights in `save_dtype`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[save_dtype]
    export = copy.deepcopy(model).to(dtype)
    export.config.dtype = dtype
    generation_config = export.generation_config
    for key, value in GENERATION_DEFAULTS.items():
        setattr(generation_config, key, value)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        export.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, Path(tmp) / name)
        (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        for item in sorted(Path(tmp).iterdir()):
            os.replace(item, out_dir / item.name)
    logger.info("exported %s checkpoint to %s", save_dtype, out_dir)
