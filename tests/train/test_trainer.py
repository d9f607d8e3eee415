"""The trainer: it learns (overfits a tiny corpus), is deterministic, resumes bit-exactly, and
refuses to clobber a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from frugal.errors import ConfigError
from frugal.train.checkpoint import state_path
from frugal.train.lm import LOG_FILE, Trainer, lr_at

from .conftest import tiny_config

pytest.importorskip("transformers")


@pytest.fixture()
def small_file(tmp_path, corpus_dir):
    """600 characters (~250 tokens): small enough for a 2-layer model to memorise in a few dozen steps."""
    path = tmp_path / "small.txt"
    path.write_text((corpus_dir / "part1.txt").read_text()[:600])
    return path


def test_overfits_a_tiny_corpus(tmp_path, zoo_tokenizer, small_file):
    config = tiny_config(zoo_tokenizer, [str(small_file)],
                         data={"val_every": 50, "val_block_tokens": 64},
                         optim={"max_steps": 60, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 5, "log_every": 10,
                                "eval_every": 60, "checkpoint_every": 60})
    trainer = Trainer(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress_bar=False)
    first = trainer.evaluate()
    progress = trainer.train()
    assert math.isclose(first, math.log(512), rel_tol=0.1)  # a fresh model is near uniform
    assert progress.last_train_loss < 0.6, progress.last_train_loss  # from ln(512) = 6.2
    log = [json.loads(line) for line in (tmp_path / "out" / LOG_FILE).read_text().splitlines()]
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] / 5
    assert all(r["tokens_per_s"] > 0 for r in log if "train_loss" in r)


def test_lr_schedule():
    values = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(115)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)
    assert values[110] == values[114] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_resume_is_bit_exact(tmp_path, zoo_tokenizer, corpus_dir):
    """Stopped at step 2 and resumed in a new Trainer == trained straight through: identical weights,
    AdamW moments and validation loss. (The two runs also start from separately built models, so this
    checks that initialisation and batches are deterministic too.)"""
    config = tiny_config(zoo_tokenizer, [str(corpus_dir)],
                         optim={"max_steps": 4, "grad_accum_steps": 2, "eval_every": 2, "checkpoint_every": 100})
    cache = tmp_path / "cache"
    straight = Trainer(config, tmp_path / "straight", cache_dir=cache, progress_bar=False)
    straight.train()

    interrupted = Trainer(config, tmp_path / "resumed", cache_dir=cache, progress_bar=False)
    interrupted.train(stop_at_step=2)
    assert interrupted.progress.step == 2 and state_path(tmp_path / "resumed").is_file()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(config, tmp_path / "resumed", cache_dir=cache)
    resumed = Trainer(config, tmp_path / "resumed", resume=True, cache_dir=cache, progress_bar=False)
    assert resumed.progress.step == 2
    resumed.train()

    assert resumed.progress.tokens_seen == straight.progress.tokens_seen == 4 * 2 * 4 * 32
    assert resumed.progress.last_val_loss == straight.progress.last_val_loss
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(straight.optimizer.state.values(),
                                                            resumed.optimizer.state.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_resume_refuses_another_model_shape(tmp_path, zoo_tokenizer, corpus_dir):
    config = tiny_config(zoo_tokenizer, [str(corpus_dir)], optim={"max_steps": 2})
    Trainer(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress_bar=False).train()
    wider = tiny_config(zoo_tokenizer, [str(corpus_dir)], model={"intermediate_size": 256})
    with pytest.raises(ConfigError, match="differs"):
        Trainer(wider, tmp_path / "out", resume=True, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="no training state"):
        Trainer(config, tmp_path / "elsewhere", resume=True, cache_dir=tmp_path / "cache")


def test_bad_data_is_refused_before_training(tmp_path, zoo_tokenizer, corpus_dir):
    with pytest.raises(ConfigError, match="matches no file"):
        Trainer(tiny_config(zoo_tokenizer, [str(tmp_path / "none.txt")]), tmp_path / "o", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Trainer(tiny_config(tmp_path, [str(corpus_dir)]), tmp_path / "o", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Trainer(tiny_config(zoo_tokenizer, [str(corpus_dir)], data={"seq_len": 128}), tmp_path / "o",
                cache_dir=tmp_path)
    assert not (tmp_path / "o").exists()
