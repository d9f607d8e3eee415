"""Every fast path against its oracle: frugal's CPU kernels equal dequantise-then-matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugal.quant.int4 import dequantize_int4, quantize_int4, to_kernel_layout
from frugal.quant.int8 import dequantize_int8, quantize_int8

# fp32 activations: the kernels use the oracle's exact weights; only the summation order differs.
# bf16 activations: the oracle rounds each dequantised weight to bf16, the kernel does not.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def oracle(x, weight, bias):
    return F.linear(x.float(), weight.to(x.dtype).float(), None if bias is None else bias.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size,scheme,in_features", [(32, "sym", 128), (64, "asym", 192), (128, "sym", 576),
                                                           (128, "asym", 172), (32, "asym", 64)])
@pytest.mark.parametrize("num_rows", [1, 3, 6, 40])
def test_int4_kernel_matches_dequantized_matmul(cpu_ops, dtype, group_size, scheme, in_features, num_rows):
    torch.manual_seed(num_rows)
    out_features = 37  # not a multiple of the kernel's 4-row tile
    packed = quantize_int4(torch.randn(out_features, in_features) * 0.05, group_size, scheme)
    weight = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, group_size, in_features)
    x = torch.randn(num_rows, in_features).to(dtype)
    bias = (torch.randn(out_features) * 0.1).to(dtype)
    qweight, scales, qzeros = to_kernel_layout(packed.qweight, packed.scales, packed.qzeros)
    y = cpu_ops.int4_linear(x, qweight, scales, qzeros, group_size, bias, 16)
    assert y.dtype == dtype and y.shape == (num_rows, out_features)
    torch.testing.assert_close(y.float(), oracle(x, weight, bias), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_int8_kernel_matches_dequantized_matmul(cpu_ops, dtype, num_rows):
    torch.manual_seed(num_rows)
    packed = quantize_int8(torch.randn(29, 96))
    weight = dequantize_int8(packed.qweight, packed.scales)
    x = torch.randn(num_rows, 96).to(dtype)
    y = cpu_ops.int8_linear(x, packed.qweight, packed.scales, None, 16)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), oracle(x, weight, None), **TOLERANCES[dtype])


@pytest.mark.parametrize("num_rows", [1, 4, 7, 40])
# One activation row streams each weight row with four accumulators over 128 features, then 32 at a time:
# 96 (remainder only), 224 (both), 2048 (many blocks).
@pytest.mark.parametrize("in_features", [96, 128, 224, 2048])
def test_bf16_kernel_matches_linear(cpu_ops, num_rows, in_features):
    torch.manual_seed(num_rows)
    weight = torch.randn(45, in_features).bfloat16()
    x = torch.randn(num_rows, in_features).bfloat16()
    bias = torch.randn(45).bfloat16()
    y = cpu_ops.bf16_linear(x, weight, bias, 16)
    torch.testing.assert_close(y.float(), oracle(x, weight, bias), atol=2e-2, rtol=2e-2)


def test_kernels_reject_bad_input(cpu_ops):
    packed = quantize_int4(torch.randn(8, 64), 32, "sym")
    with pytest.raises(RuntimeError, match="2-D"):
        cpu_ops.int4_linear(torch.randn(2, 3, 64), packed.qweight, packed.scales, None, 32, None, 16)
    with pytest.raises(RuntimeError, match="features"):
        cpu_ops.int4_linear(torch.randn(2, 65), packed.qweight, packed.scales, None, 32, None, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_ops.int4_linear(torch.randn(2, 64).half(), packed.qweight, packed.scales, None, 32, None, 16)
