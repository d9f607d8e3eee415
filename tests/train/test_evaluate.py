"""Model-card measurements on tiny random models, checked against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from frugal.train import evaluate
from frugal.train.config import ModelSpec
from frugal.train.model import build_model

pytest.importorskip("transformers")
SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def model(seed: int = 0, **overrides):
    return build_model(ModelSpec(**{**SPEC, **overrides}), vocab_size=512, seed=seed).eval()


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_windows_predict_every_token_once():
    tokens = torch.arange(100)
    targets = torch.cat([t[0] for _, t in evaluate.windows(tokens, 32)])
    assert targets.tolist() == list(range(1, 100))
    assert all(i.shape == t.shape and i.shape[1] <= 32 for i, t in evaluate.windows(tokens, 32))


def test_perplexity_is_exp_mean_nll():
    m, sequence = model(), ids(40)
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([sequence])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(sequence[1:]), reduction="sum").item()
    result = evaluate.perplexity(m, sequence, context_len=64)
    assert result["tokens"] == 39
    assert math.isclose(result["nll"], nll, rel_tol=1e-5)
    assert math.isclose(result["token_perplexity"], math.exp(nll / 39), rel_tol=1e-5)


def test_agreement_of_a_model_with_itself_and_with_another():
    # untied: a tied random model just predicts its input token, whatever the seed
    a, b, sequence = model(0, tie_word_embeddings=False), model(1, tie_word_embeddings=False), ids(100)
    assert evaluate.teacher_forced_agreement(a, a, sequence, 32) == {"positions": 99, "agreement": 1.0}
    assert evaluate.teacher_forced_agreement(a, b, sequence, 32)["agreement"] < 0.5
    same = evaluate.generated_agreement(a, a, [sequence[:8], sequence[8:16]], new_tokens=6)
    assert same == {"positions": 12, "agreement": 1.0, "mean_leading_run": 6.0}


def test_relu_zero_fraction_matches_the_gate_signs():
    m, sequence = model(hidden_act="relu"), ids(50)
    fractions = evaluate.relu_zero_fraction(m, sequence, 64)
    hidden = {}
    handle = m.model.layers[1].mlp.register_forward_pre_hook(lambda mod, args: hidden.setdefault("x", args[0]))
    with torch.no_grad():
        m(input_ids=torch.tensor([sequence[:-1]]))
        handle.remove()
        activations = torch.relu(m.model.layers[1].mlp.gate_proj(hidden["x"]))
    assert len(fractions) == 2 and 0.2 < fractions[1] < 0.8
    assert math.isclose(fractions[1], (activations == 0).float().mean().item(), rel_tol=1e-6)


def test_expert_load_is_a_distribution_per_layer():
    m = model(architecture="mixtral", num_local_experts=4, num_experts_per_tok=2)
    load = evaluate.expert_load(m, ids(80), 32)
    assert len(load) == 2 and all(len(row) == 4 for row in load)
    assert all(math.isclose(sum(row), 1.0) for row in load)
    assert all(0 <= x <= 0.5 for row in load for x in row)  # top-2: an expert takes at most half the slots
