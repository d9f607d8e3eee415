"""The torch.compile'd decode step (frugal.runner.compiled_decode): same tokens as eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

from frugal import LLM, SamplingParams
from frugal.config import ModelConfig
from frugal.errors import ConfigError
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.quant.kernels import cpu_kernels
from tiny_models import make_tiny_checkpoint

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="frugal's CPU kernels are not available here")

PROMPTS = [[1, 5, 9, 33, 70], [1, 400, 3, 17], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260, 261, 262,
                                                263, 264, 265, 266, 267]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=3)


def test_config_validates_compile():
    with pytest.raises(ConfigError, match="compile must be True or False"):
        ModelConfig(model="m", compile="yes")
    with pytest.raises(ConfigError, match="CPU decode path"):
        ModelConfig(model="m", device="cuda", compile=True)


@needs_kernels
def test_decode_tensors_path_matches_backend(checkpoint):
    """Attention with DecodeTensors (the traced ops) == the cpu backend with AttentionMetadata, eagerly,
    for a decode batch of two requests; the KV cache rows written are the same too."""
    from frugal.runner.compiled_decode import decode_tensors

    llm = LLM(str(checkpoint), dtype="bfloat16", quantization="int4", kv_cache_memory="16MiB")
    engine = llm.engine
    caches = [torch.randn_like(c) for c in engine.kv_caches]  # garbage outside the written slots
    copy = [c.clone() for c in caches]
    block_size = engine.config.cache.block_size
    seq_lens = [5, 21]  # request 1 spans two blocks; request 0 one (padded to two columns)
    md = AttentionMetadata(slot_mapping=torch.tensor([3 * block_size + 4, 5 * block_size + 4]),
                           block_tables=torch.tensor([[3, 0], [4, 5]]), query_start_loc=[0, 1, 2], query_lens=[1, 1],
                           seq_lens=seq_lens, block_size=block_size)
    input_ids, positions = torch.tensor([7, 300]), torch.tensor([4, 20])
    with torch.inference_mode():
        expected = engine.model(input_ids, positions, caches, md)
        tensors = decode_tensors(md)
        got = engine.model(input_ids, positions, copy, tensors)
    assert torch.equal(got, expected)
    for a, b in zip(caches, copy):
        assert torch.equal(a, b)
    one = AttentionMetadata(slot_mapping=torch.tensor([3 * block_size + 4]), block_tables=torch.tensor([[3]]),
                            query_start_loc=[0, 1], query_lens=[1], seq_lens=[5], block_size=block_size)
    assert decode_tensors(one).block_tables.tolist() == [[3, 0]]  # padded: no width-1 specialisation


@needs_kernels
# Compiles two graphs (batch 1 and batch > 1), ~1 min on a 2-core machine: INT4 (the CPU fast path)
# always runs, the 16-bit variant with --runslow.
@pytest.mark.parametrize("quantization", ["int4", pytest.param(None, marks=pytest.mark.slow)])
def test_compiled_greedy_equals_eager(checkpoint, quantization):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kwargs = dict(dtype="bfloat16", quantization=quantization, kv_cache_memory="16MiB")
    eager = LLM(str(checkpoint), native_decode=False, **kwargs)
    compiled = LLM(str(checkpoint), compile=True, **kwargs)
    forward = compiled.engine.runner.model_forward
    assert forward is not compiled.engine.model, "compile=True fell back to eager"
    graphs_before = dynamo_counters["stats"]["unique_graphs"]

    def tokens(llm, prompts):
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    # Batch 1, then three requests decoding together (with different lengths: a mixed prefill+decode
    # step runs eagerly, pure decode steps compiled).
    assert tokens(compiled, PROMPTS[:1]) == tokens(eager, PROMPTS[:1])
    assert tokens(compiled, PROMPTS) == tokens(eager, PROMPTS)
    assert forward._seen_batches == {True, False}, "both decode graphs should have run"
    # Two graphs (batch 1, batch > 1), however long the sequences grow (block tables widen 1 -> 3 here).
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2
