"""Training configs are validated once, with errors naming the key; the shipped recipes are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugal.errors import ConfigError
from frugal.train.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "models" / "recipes"
MINIMAL = """
[model]
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
files = ["text/*.txt"]
tokenizer = "tok"
[optim]
max_steps = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = TrainConfig.from_toml(write(tmp_path, MINIMAL))
    assert config.data.files == (str(tmp_path / "text/*.txt"),)
    assert config.data.tokenizer == str(tmp_path / "tok")
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)


@pytest.mark.parametrize("edit, message", [
    (("hidden_size = 64", "hidden_sise = 64"), "unknown key.*hidden_sise"),
    (("max_steps = 10", "max_steps = 10.5"), "max_steps = 10.5 has the wrong type"),
    (("max_steps = 10", "max_steps = 0"), "optim.max_steps must be positive"),
    (("num_attention_heads = 4", "num_attention_heads = 3"), "divisible"),
    (("[optim]", "hidden_act = \"tanh\"\n[optim]"), "unknown key|hidden_act"),
    (("[optim]\nmax_steps = 10", ""), "missing \\[optim\\]"),
])
def test_bad_configs_name_the_problem(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_toml(write(tmp_path, MINIMAL.replace(*edit)))


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_toml(write(tmp_path, "[model\n"))


@pytest.mark.parametrize("name, architecture, act", [
    ("target", "llama", "silu"), ("draft", "llama", "silu"), ("relu", "llama", "relu"), ("moe", "mixtral", "silu")])
def test_recipes_are_valid(name, architecture, act):
    config = TrainConfig.from_toml(RECIPES / f"{name}.toml")
    assert (config.model.architecture, config.model.hidden_act) == (architecture, act)
    assert Path(config.data.tokenizer) == (RECIPES.parent / "tokenizer").resolve()
    assert not any("wikitext" in f for f in config.data.files), "WikiText-2 is for evaluation only"
    assert config.data.seq_len <= config.model.max_position_embeddings


def test_variants_share_the_target_shape():
    target, relu, moe = (TrainConfig.from_toml(RECIPES / f"{n}.toml").model for n in ("target", "relu", "moe"))
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    assert all(getattr(relu, k) == getattr(target, k) for k in (*shape, "intermediate_size"))
    assert all(getattr(moe, k) == getattr(target, k) for k in shape)
    # similar active size: the top-k experts together are as wide as the target's MLP
    assert moe.num_experts_per_tok * moe.intermediate_size == target.intermediate_size
    assert (moe.num_local_experts, moe.num_experts_per_tok) == (8, 2)
