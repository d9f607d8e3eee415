"""Huge-page advice for weights: best effort, never changes contents, switchable."""

from __future__ import annotations

import sys

import pytest
import torch

from frugal.model.huge_pages import MIN_TENSOR_BYTES, advise_huge_pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only here")
def test_advice_covers_large_tensors_and_keeps_contents(monkeypatch):
    monkeypatch.delenv("FRUGAL_HUGE_PAGES", raising=False)
    big = torch.arange(2 * MIN_TENSOR_BYTES // 4, dtype=torch.float32)
    small = torch.ones(16)
    before = big.clone()
    advised = advise_huge_pages([big, small, big.view(2, -1)])  # a view of the same storage counts once
    assert 0 < advised <= big.numel() * 4 and advised > big.numel() * 4 - 2 * 4096
    assert torch.equal(big, before)
    monkeypatch.setenv("FRUGAL_HUGE_PAGES", "0")
    assert advise_huge_pages([big]) == 0

