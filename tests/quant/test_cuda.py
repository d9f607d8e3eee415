"""CUDA paths against the dequantise oracle (need a GPU; skipped without one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugal.quant.int4 import dequantize_int4, quantize_int4


@pytest.mark.gpu
@pytest.mark.parametrize("group_size,scheme,in_features", [(32, "sym", 256), (128, "asym", 576), (64, "sym", 192)])
def test_tinygemm_int4_matches_dequantized_matmul(group_size, scheme, in_features):
    from frugal.quant.cuda import pack_for_tinygemm, tinygemm_linear

    torch.manual_seed(0)
    packed = quantize_int4(torch.randn(96, in_features) * 0.05, group_size, scheme)
    weight = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, group_size, in_features).cuda()
    state = pack_for_tinygemm(packed.qweight.cuda(), packed.scales.cuda(),
                              None if packed.qzeros is None else packed.qzeros.cuda(), group_size, in_features)
    x = torch.randn(3, in_features, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(tinygemm_linear(x, state, group_size, in_features, None).float(),
                               F.linear(x.float(), weight), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_quantized_llm_runs_on_cuda(stories260k):
    from frugal import LLM, SamplingParams

    llm = LLM(str(stories260k), device="cuda", dtype="bfloat16", quantization="int4", kv_cache_memory="64MiB")
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert len(out.outputs[0].token_ids) == 8
