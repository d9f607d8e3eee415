"""Gated activations match transformers' ACT2FN applied to the gate, times up; ArchConfig accepts exactly
the activations the layer implements."""

from __future__ import annotations

import pytest
import torch

from frugal.layers.activation import GATED_ACTIVATIONS, get_act_and_mul
from frugal.model.arch_config import SUPPORTED_ACTIVATIONS


@pytest.mark.parametrize("name", GATED_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_matches_transformers(name, dtype):
    transformers = pytest.importorskip("transformers")
    act = transformers.activations.ACT2FN[name]
    x = (3 * torch.randn(7, 2 * 24, generator=torch.Generator().manual_seed(0))).to(dtype)  # both signs
    expected = act(x[:, :24]) * x[:, 24:]
    out = get_act_and_mul(name)(x)
    assert out.shape == (7, 24) and out.dtype == dtype
    if name == "silu":  # the fused CPU kernel may round differently from eager
        torch.testing.assert_close(out, expected)
    else:
        assert torch.equal(out, expected)


def test_relu_gate_zeroes_negative_gates():
    x = torch.tensor([[-1.0, 2.0, 5.0, 7.0]])  # gate [-1, 2], up [5, 7]
    assert get_act_and_mul("relu")(x).tolist() == [[0.0, 14.0]]


def test_arch_config_and_layer_agree():
    assert set(SUPPORTED_ACTIVATIONS) == set(GATED_ACTIVATIONS)
    with pytest.raises(ValueError, match="unsupported gated activation 'tanh'"):
        get_act_and_mul("tanh")
