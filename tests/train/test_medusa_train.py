"""`frugal train medusa`: the heads learn (held-out KL to the shifted base distribution falls), the
run is seed-deterministic, what it saves loads back, and the CLI runs as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugal.errors import ConfigError
from frugal.spec.medusa import CONFIG_FILE, WEIGHTS_FILE, load_medusa, probe_tokens
from frugal.train.medusa import RANKS_MEASURED, MedusaTrainConfig, MedusaTrainer
from tiny_models import make_tiny_checkpoint

pytest.importorskip("transformers")

TARGET = Path(__file__).resolve().parents[2] / "models" / "target"
SPLIT = {"seq_len": 32, "val_every": 8, "val_block_tokens": 256}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random-weight Llama (vocab 512, the zoo tokenizer's size)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama", seed=1)


def make_trainer(base_model, zoo_tokenizer, corpus_dir, tmp_path, **overrides) -> MedusaTrainer:
    config = MedusaTrainConfig(**{"num_heads": 3, "steps": 30, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3,
                                  "warmup_steps": 3, "eval_batches": 4, **SPLIT, **overrides})
    return MedusaTrainer(base_model, [str(corpus_dir)], config, out_dir=tmp_path / "heads",
                         tokenizer_dir=zoo_tokenizer, cache_dir=tmp_path / "cache", progress_bar=False)


def test_heads_learn_and_save(corpus_dir, tmp_path):
    """On the bundled target (a real language model) with its own tokenizer: 30 steps cut every
    head's held-out KL to the base distribution k+1 positions later."""
    if not (TARGET / "model.safetensors").is_file():
        pytest.skip("models/target not present")
    torch.set_num_threads(1)
    trainer = MedusaTrainer(TARGET, [str(corpus_dir)], MedusaTrainConfig(
        num_heads=3, steps=30, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_batches=4, **SPLIT),
        out_dir=tmp_path / "heads", cache_dir=tmp_path / "cache", progress_bar=False)
    before = trainer.evaluate(4)
    summary = trainer.train()
    after = summary["heldout"]
    for k in range(3):
        assert after["kl"][k] < 0.8 * before["kl"][k], (before["kl"], after["kl"])
    assert sum(after["top1_agreement"]) > sum(before["top1_agreement"])
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 32

    out = trainer.save()
    heads = load_medusa(out, hidden_size=384, vocab_size=8192)
    config = heads.config
    assert (config.num_heads, config.shared_lm_head) == (3, True)
    assert len(config.rank_accuracy) == 3 and all(len(row) == RANKS_MEASURED for row in config.rank_accuracy)
    assert all(0 <= a <= 1 for row in config.rank_accuracy for a in row)
    assert config.training["heldout"]["top1_agreement"] == after["top1_agreement"]
    assert config.base_model["probe_top_tokens"] == probe_tokens(trainer.lm_head, 384)
    hidden = torch.randn(4, 384)
    with torch.no_grad():
        assert torch.allclose(heads(hidden, trainer.lm_head), trainer.heads(hidden, trainer.lm_head))
    # shared LM head: only the residual blocks are stored
    assert (out / WEIGHTS_FILE).stat().st_size < 3 * (384 * 384 + 384) * 4 + 4096


def test_same_seed_same_heads(base_model, zoo_tokenizer, corpus_dir, tmp_path):
    torch.set_num_threads(1)
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(base_model, zoo_tokenizer, corpus_dir, tmp_path / name, steps=3)
        trainer.train()
        runs.append(trainer.heads.state_dict())
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert any(runs[0][name].abs().sum() > 0 for name in runs[0])  # they did move from zero


def test_own_lm_heads_start_from_the_base_lm_head(base_model, zoo_tokenizer, corpus_dir, tmp_path):
    trainer = make_trainer(base_model, zoo_tokenizer, corpus_dir, tmp_path, shared_lm_head=False, steps=2,
                           distill="hard")
    assert all(torch.equal(head.weight, trainer.lm_head.weight) for head in trainer.heads.lm_heads)
    trainer.train()
    out = trainer.save()
    assert not json.loads((out / CONFIG_FILE).read_text())["shared_lm_head"]
    assert load_medusa(out).lm_heads is not None


@pytest.mark.parametrize("bad, message", [({"num_heads": 0}, "num_heads"), ({"distill": "x"}, "distill"),
                                          ({"head_decay": 0.0}, "head_decay"), ({"seq_len": 3, "num_heads": 4},
                                                                                "seq_len")])
def test_bad_settings_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        MedusaTrainConfig(**bad)


def test_a_model_without_tokenizer_json_is_a_clear_error(base_model, corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.json"):
        MedusaTrainer(base_model, [str(corpus_dir)], MedusaTrainConfig(**SPLIT), cache_dir=tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal.cli.main", "train", "medusa", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli(base_model, zoo_tokenizer, corpus_dir, tmp_path):
    out = tmp_path / "heads"
    result = run_cli("--model", str(base_model), "--data", str(corpus_dir), "--tokenizer", str(zoo_tokenizer),
                     "--heads", "2", "--steps", "2", "--seq-len", "32", "--eval-batches", "1", "--out", str(out),
                     "--val-every", "8", "--val-block-tokens", "256",
                     "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and len(summary["heldout"]["top1_agreement"]) == 2
    assert "step 2/2" in result.stderr
    assert load_medusa(out).num_heads == 2
    result = run_cli("--model", str(base_model), "--data", str(tmp_path / "missing.txt"), "--tokenizer",
                     str(zoo_tokenizer))
    assert result.returncode == 2 and "matches no file" in result.stderr and "Traceback" not in result.stderr


def test_self_distillation_trains_on_the_models_own_continuations(base_model, zoo_tokenizer, corpus_dir, tmp_path):
    """Rows = a real training prefix + the model's own continuation: greedy rows equal what the
    engine decodes greedily from that prefix. `init_from` starts from saved heads."""
    from frugal import LLM, SamplingParams

    torch.set_num_threads(1)
    first = make_trainer(base_model, zoo_tokenizer, corpus_dir, tmp_path / "first", steps=2)
    first.train()
    start = first.save()
    trainer = make_trainer(base_model, zoo_tokenizer, corpus_dir, tmp_path / "second", steps=2, self_distill=4,
                           init_from=str(start))
    assert all(torch.equal(a, b) for a, b in zip(trainer.heads.state_dict().values(),
                                                 first.heads.state_dict().values()))
    rows = trainer.train_sampler.rows
    assert rows.shape == (4, 33)
    prefix = 16
    train = trainer.sampler.train.tolist()
    text = ",".join(map(str, train))
    assert all(",".join(map(str, row[:prefix].tolist())) in text for row in rows)
    greedy = LLM(str(base_model), dtype="float32", kv_cache_memory="16MiB").generate(
        [rows[0, :prefix].tolist()], SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))[0]
    assert rows[0, prefix:].tolist() == list(greedy.outputs[0].token_ids)
    inputs, targets = trainer.train_sampler.batch(0, 0)
    assert inputs.shape == (8, 32) and torch.equal(inputs[:, 1:], targets[:, :-1])
    trainer.train()
    assert trainer.tokens_seen == 2 * 8 * 32
