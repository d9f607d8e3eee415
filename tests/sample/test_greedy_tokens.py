"""greedy_tokens: torch.argmax(dim=-1)'s answer, from frugal's single-threaded kernel on the CPU."""

from __future__ import annotations

import pytest
import torch

from frugal.quant.kernels import cpu_kernels
from frugal.sample.sampler import greedy_tokens


@pytest.mark.parametrize("vocab", [1, 15, 16, 1000, 49152, 32001])
def test_matches_torch_argmax(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(5, vocab)
    logits[1] = 0.0  # all tied: the first index
    if vocab > 3:
        logits[2, vocab // 3] = logits[2, vocab - 1] = 50.0  # a tie for the maximum: the first of the two
        logits[3] = float("-inf")
        logits[3, vocab - 2] = -1e30
        logits[4, vocab // 2] = float("nan")  # NaN wins, as in torch
        logits[4, vocab - 1] = float("nan")
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


@pytest.mark.skipif(cpu_kernels() is None, reason="frugal's CPU kernels are not available here")
def test_kernel_is_used_and_checks_its_input():
    ops = cpu_kernels()
    logits = torch.randn(2, 100)
    assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(logits.t().contiguous().t()), logits.argmax(dim=-1))  # non-contiguous
    with pytest.raises(RuntimeError, match="float32 logits"):
        ops.argmax_rows(logits.to(torch.bfloat16))
    assert torch.equal(greedy_tokens(logits.to(torch.bfloat16)), logits.to(torch.bfloat16).argmax(dim=-1))
