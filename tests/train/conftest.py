"""Fixtures for the trainer tests: a small slice of real English text (Tiny Shakespeare), a 512-token
BPE trained on it, and tiny model configs that train in seconds on one CPU thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugal.train.config import TrainConfig

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Two text files (~24 KB) cut from Tiny Shakespeare, and a README that training must skip."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    out = tmp_path_factory.mktemp("corpus")
    (out / "part1.txt").write_text(text[:12000], encoding="utf-8")
    (out / "part2.txt").write_text(text[12000:24000], encoding="utf-8")
    (out / "README.md").write_text("not training text\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def zoo_tokenizer(tmp_path_factory, corpus_dir) -> Path:
    from frugal.train.tokenizer import train_tokenizer

    return train_tokenizer([str(corpus_dir)], 512, tmp_path_factory.mktemp("tokenizer"))


def tiny_config(tokenizer: Path, files: list[str], model: dict | None = None, optim: dict | None = None,
                data: dict | None = None) -> TrainConfig:
    """A 2-layer, hidden-64 decoder on short windows, float32 end to end unless overridden."""
    raw = {
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 64, **(model or {})},
        "data": {"files": files, "tokenizer": str(tokenizer), "seq_len": 32, "val_every": 8,
                 "val_block_tokens": 256, **(data or {})},
        "optim": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "autocast_dtype": "float32", "save_dtype": "float32", "log_every": 2, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 3, **(optim or {})},
    }
    return TrainConfig.from_dict(raw)
