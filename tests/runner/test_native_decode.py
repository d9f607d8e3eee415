"""The native (one C++ call) decode step, frugal.runner.native_decode: exactly the eager model's numbers."""

from __future__ import annotations

import pytest
import torch

from frugal import LLM, SamplingParams
from frugal.config import ModelConfig
from frugal.errors import ConfigError
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.quant.kernels import cpu_kernels
from tiny_models import make_tiny_checkpoint

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="frugal's CPU kernels are not available here")

PROMPTS = [[1, 5, 9, 33, 70], [1, 400, 3, 17], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260, 261, 262,
                                                263, 264, 265, 266, 267]]

# (family, dtype, quantization, quant_activations, checkpoint overrides): every kernel kind the stack calls
# (int4 x16 and 4-row layouts, int8 x16 and per-channel, the bf16 GEMV, F.linear), q/k/v biases (qwen2), a
# sliding window (mistral), llama3 rope scaling, a tied head and one KV head.
CASES = [
    ("llama", "bfloat16", "int4", "int8", {}),
    ("llama3_rope", "bfloat16", "int4", "exact", {}),
    ("qwen2", "bfloat16", "int8", "int8", {}),
    ("llama_tied", "bfloat16", "int8", "exact", {}),
    ("mistral", "float32", None, "int8", {"sliding_window": 8}),
    ("llama", "bfloat16", None, "int8", {}),
]


def _checkpoint(tmp_path_factory, family: str, overrides: dict):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(family), family, seed=5, **overrides)


def test_config_validates_native_decode():
    with pytest.raises(ConfigError, match="native_decode must be True or False"):
        ModelConfig(model="m", native_decode="yes")


@needs_kernels
@pytest.mark.parametrize("family,dtype,quantization,activations,overrides", CASES)
def test_native_step_equals_eager(tmp_path_factory, family, dtype, quantization, activations, overrides):
    """A decode batch of three requests (one spanning three blocks, garbage in unwritten cache slots):
    the same hidden states, KV cache writes and logits as the eager model, bit for bit."""
    from frugal.runner.native_decode import NativeDecode

    checkpoint = _checkpoint(tmp_path_factory, family, overrides)
    llm = LLM(str(checkpoint), dtype=dtype, quantization=quantization, quant_activations=activations,
              kv_cache_memory="16MiB")
    engine = llm.engine
    native = engine.runner.model_forward
    assert isinstance(native, NativeDecode), "native_decode=True fell back to eager"
    if overrides.get("sliding_window"):  # the window is narrower than the longest request
        assert engine.model.model.layers[0].self_attn.attn.sliding_window == overrides["sliding_window"]
    torch.manual_seed(0)
    eager_caches = [torch.randn_like(c) for c in engine.kv_caches]
    native_caches = [c.clone() for c in eager_caches]
    block_size = engine.config.cache.block_size
    seq_lens = [5, 2 * block_size + 3, 12]
    md = AttentionMetadata(
        slot_mapping=torch.tensor([3 * block_size + 4, 6 * block_size + 2, 2 * block_size + 11]),
        block_tables=torch.tensor([[3, 0, 0], [4, 5, 6], [2, 0, 0]]), query_start_loc=[0, 1, 2, 3],
        query_lens=[1, 1, 1], seq_lens=seq_lens, block_size=block_size)
    input_ids, positions = torch.tensor([7, 300, 42]), torch.tensor([4, 2 * block_size + 2, 11])
    with torch.inference_mode():
        expected = engine.model(input_ids, positions, eager_caches, md)
        got = native(input_ids, positions, native_caches, md)
        assert native.num_native_steps == 1
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        for a, b in zip(eager_caches, native_caches):
            assert torch.equal(a, b)
        assert torch.equal(native.compute_logits(got), engine.model.compute_logits(expected))


@needs_kernels
@pytest.mark.parametrize("quantization", ["int4", None])
def test_native_generation_equals_eager(tmp_path_factory, quantization):
    """Greedy and seeded sampling through the engine: the same tokens with and without the native step,
    for one request and for three decoding together (mixed prefill + decode steps run eagerly)."""
    checkpoint = _checkpoint(tmp_path_factory, "llama", {})
    kwargs = dict(dtype="bfloat16", quantization=quantization, kv_cache_memory="16MiB")
    eager = LLM(str(checkpoint), native_decode=False, **kwargs)
    native = LLM(str(checkpoint), **kwargs)
    assert eager.engine.runner.model_forward is eager.engine.model

    def tokens(llm, prompts, params):
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)
    for params in (greedy, seeded):
        assert tokens(native, PROMPTS[:1], params) == tokens(eager, PROMPTS[:1], params)
        assert tokens(native, PROMPTS, params) == tokens(eager, PROMPTS, params)
    assert native.engine.runner.model_forward.num_native_steps > 0


@needs_kernels
@pytest.mark.parametrize("family,kwargs,reason", [
    ("llama", {"attention_backend": "sdpa"}, "'cpu' attention backend"),
    ("llama_relu", {}, "dense SwiGLU"),
    ("mixtral", {}, "dense SwiGLU"),
])
def test_unsupported_models_run_eagerly(tmp_path_factory, family, kwargs, reason):
    from frugal.runner.native_decode import native_decode_unsupported

    checkpoint = _checkpoint(tmp_path_factory, family, {})
    llm = LLM(str(checkpoint), dtype="float32", kv_cache_memory="16MiB", **kwargs)
    assert reason in native_decode_unsupported(llm.engine.model)
    assert llm.engine.runner.model_forward is llm.engine.model
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


@needs_kernels
def test_stack_rejects_bad_inputs(tmp_path_factory):
    """Wrong shapes reach the C++ step as clear errors, not memory corruption."""
    checkpoint = _checkpoint(tmp_path_factory, "llama", {})
    engine = LLM(str(checkpoint), dtype="bfloat16", kv_cache_memory="16MiB").engine
    stack = engine.runner.model_forward.stack
    hidden = torch.zeros(1, engine.arch.hidden_size, dtype=torch.bfloat16)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="one KV cache per layer"):
        stack.forward(hidden, one, engine.kv_caches[:1], one, torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        stack.forward(hidden, one, engine.kv_caches, torch.tensor([10**9]), torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="one position, slot"):
        stack.forward(hidden, torch.tensor([0, 1]), engine.kv_caches, one, torch.tensor([[0]]), torch.tensor([1]))
