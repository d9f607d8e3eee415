"""Fixtures for the quantization tests: frugal's compiled CPU kernels (skip when they cannot be built)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cpu_ops():
    from frugal.quant.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None:
        pytest.skip("frugal CPU kernels are not available here")
    return ops


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama (transformers-written, fp32, 512-token SentencePiece tokenizer)."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), "llama_tied")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")
