"""A real (tiny) base model for Medusa tests: a 512-token BPE and a 2-layer Llama trained by the zoo
trainer on a short slice of Tiny Shakespeare until it has nearly memorised it, so heads trained on
the same text predict several tokens ahead and speculation accepts deep tree paths."""

from __future__ import annotations

from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TEXT_CHARS = 1500


def write_text(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "text.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:TEXT_CHARS], encoding="utf-8")
    return path


def make_memorising_model(out_dir: Path, steps: int = 80) -> tuple[Path, Path]:
    """-> (model directory with tokenizer.json, the training text file). A few seconds on one thread."""
    from frugal.train.config import TrainConfig
    from frugal.train.lm import Trainer
    from frugal.train.tokenizer import train_tokenizer

    text = write_text(out_dir / "data")
    from frugal.train.data import tokenize_files

    tokenizer = train_tokenizer([str(text)], 512, out_dir / "tokenizer", min_frequency=1)
    # Four blocks, the last (shorter) one held out: the first ~3/4 of the text is memorised.
    block = len(tokenize_files([text], tokenizer, out_dir / "cache")) // 4 + 1
    config = TrainConfig.from_dict({
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 128},
        "data": {"files": [str(text)], "tokenizer": str(tokenizer), "seq_len": 64, "val_every": 50,
                 "val_block_tokens": block},
        "optim": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 5,
                  "autocast_dtype": "float32", "save_dtype": "float32", "log_every": steps, "eval_every": steps,
                  "eval_batches": 1, "checkpoint_every": steps},
    })
    model_dir = out_dir / "model"
    Trainer(config, model_dir, cache_dir=out_dir / "cache", progress_bar=False).train()
    return model_dir, text


def data_split(model_dir: Path) -> dict:
    """The model's data split (for MedusaTrainConfig: the same held-out block)."""
    import json

    data = json.loads((model_dir / "training.json").read_text())["config"]["data"]
    return {"val_every": data["val_every"], "val_block_tokens": data["val_block_tokens"]}
