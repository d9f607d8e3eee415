"""RoPE variants against transformers: inverse frequencies vs ROPE_INIT_FUNCTIONS and cos/sin vs
LlamaRotaryEmbedding for the same positions."""

from __future__ import annotations

import pytest
import torch

from frugal.layers.rotary import RotaryEmbedding, compute_inv_freq, rotate_half

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

HEAD_DIM, MPE = 32, 64
VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def hf_config(scaling):
    return transformers.LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MPE,
                                    rope_theta=5000.0, rope_scaling=scaling)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("max_position", [MPE, 3 * MPE])
def test_inv_freq_matches_transformers(variant, max_position):
    scaling = VARIANTS[variant]
    ours = compute_inv_freq(HEAD_DIM, 5000.0, scaling, MPE, max_position)
    if scaling is None:
        expected = 1.0 / (5000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS[variant](hf_config(scaling), "cpu", seq_len=max_position)
        assert attention_factor == 1.0
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotation_matches_transformers(variant):
    max_position = 2 * MPE  # dynamic: transformers scales for a sequence of this length, as do we
    rope = RotaryEmbedding(HEAD_DIM, max_position, 5000.0, VARIANTS[variant], MPE)
    hf_rope = LlamaRotaryEmbedding(hf_config(VARIANTS[variant]))
    positions = torch.arange(max_position)
    q = torch.randn(max_position, 3, HEAD_DIM)
    k = torch.randn(max_position, 1, HEAD_DIM)
    cos, sin = hf_rope(q, positions[None])  # [1, L, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = rope(positions, q, k)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # A token's rotation depends only on its own position, not on the batch around it.
    picked = torch.tensor([100, 3, 3, 0])
    q_picked, _ = rope(picked, q[picked], k[picked])
    torch.testing.assert_close(q_picked, q_ours[picked])


def test_rotate_half():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-3.0, -4.0, 1.0, 2.0]


def test_cache_is_built_on_cpu_under_meta():
    with torch.device("meta"):
        rope = RotaryEmbedding(8, 16)
    assert rope.cos_cache.device.type == "cpu" and rope.cos_cache.shape == (16, 8)
