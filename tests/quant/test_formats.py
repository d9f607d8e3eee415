"""INT4 / INT8 rounding and packing: the canonical format is exact and reversible."""

from __future__ import annotations

import pytest
import torch

from frugal.errors import ConfigError
from frugal.quant.config import QuantConfig
from frugal.quant.int4 import (dequantize_int4, from_kernel_layout, pack_nibbles, padded_in_features,
                               quantize_int4, to_kernel_layout, unpack_nibbles)
from frugal.quant.int8 import dequantize_int8, quantize_int8


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (5, 128), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble = even column
    for rows in (4, 7, 9):  # full tiles of 4 and a tail
        qweight = pack_nibbles(torch.randint(0, 16, (rows, 128), dtype=torch.uint8))
        scales = torch.randn(rows, 4).half()
        zeros = torch.randint(0, 16, (rows, 4), dtype=torch.uint8)
        kernel = to_kernel_layout(qweight, scales, zeros)
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(kernel, (qweight, scales, zeros)))
        back = from_kernel_layout(*kernel)
        assert torch.equal(back[0], qweight) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("in_features", [64, 172, 576])
def test_int4_error_is_within_half_a_step(group_size, scheme, in_features):
    torch.manual_seed(0)
    weight = torch.randn(24, in_features) * 0.05
    packed = quantize_int4(weight, group_size, scheme)
    kp = padded_in_features(in_features)
    num_groups = -(-kp // group_size)
    assert packed.qweight.shape == (24, kp // 2) and packed.scales.shape == (24, num_groups)
    assert packed.scales.dtype == torch.float16
    assert (packed.qzeros is None) == (scheme == "sym")
    dequant = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, group_size, in_features)
    step = packed.scales.float().abs().repeat_interleave(group_size, dim=1)[:, :in_features]
    error = (dequant - weight).abs()
    assert (error <= step * 1.001).all()
    # Inside the grid's range rounding is to nearest (up to the float16 rounding of the scale); symmetric
    # clamps the few values past +7 steps (the Q4_0 rule maps the largest magnitude to -8).
    inside = (weight / step).abs() <= 7 if scheme == "sym" else torch.ones_like(weight, dtype=torch.bool)
    assert (error[inside] <= step[inside] * 0.51).all()
    # Padding columns dequantise to exactly zero.
    full = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, group_size, kp)
    assert torch.count_nonzero(full[:, in_features:]) == 0


def test_int4_symmetric_uses_the_full_range_like_q4_0():
    weight = torch.tensor([[-1.0, 0.5, 0.25] + [0.0] * 61])
    packed = quantize_int4(weight, 32, "sym")
    q = unpack_nibbles(packed.qweight)[0]
    assert int(q[0]) == 0  # the largest magnitude maps to -8 (q = 0)
    assert float(packed.scales[0, 0]) == pytest.approx(1.0 / 8.0)
    dequant = dequantize_int4(packed.qweight, packed.scales, None, 32, 64)
    assert float(dequant[0, 0]) == -1.0 and float(dequant[0, 1]) == 0.5


def test_int8_is_per_row_and_exact_at_the_extremes():
    weight = torch.tensor([[1.0, -0.5, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, -3.0, 1.0]])
    packed = quantize_int8(weight)
    assert packed.qweight.dtype == torch.int8 and packed.scales.shape == (3,)
    dequant = dequantize_int8(packed.qweight, packed.scales)
    assert float(dequant[0, 0]) == pytest.approx(1.0) and float(dequant[2, 2]) == pytest.approx(-3.0)
    assert torch.count_nonzero(dequant[1]) == 0
    assert ((dequant - weight).abs() <= packed.scales[:, None] / 2 + 1e-7).all()


def test_quant_config_validates_and_round_trips_through_json():
    config = QuantConfig.create("int4", group_size=128, scheme="asym")
    assert config.name == "int4-g128-asym"
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.create(None) is None and QuantConfig.create("none") is None
    assert QuantConfig.create("int8").group_size is None
    for bad in (dict(bits=3), dict(bits=4, group_size=48), dict(bits=4, scheme="nf4"), dict(bits=8, group_size=32),
                dict(bits=4, lm_head_bits=2), dict(bits=8, embedding_bits=4), dict(bits=4, method="awq")):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    with pytest.raises(ConfigError, match="int4"):
        QuantConfig.create("int3")
    with pytest.raises(ConfigError, match="gptq"):
        QuantConfig.from_json({"quant_method": "gptq", "bits": 4})
