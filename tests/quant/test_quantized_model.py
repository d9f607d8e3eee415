"""Quantized models end to end: kernels vs the dequantise oracle, checkpoint round trip, greedy stability."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from frugal.errors import ConfigError
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.quant.config import QuantConfig
from frugal.quant.convert import quantize_checkpoint
from frugal.runner.kv_cache import allocate_kv_caches
from model.helpers import run_schedule

CONFIGS = [QuantConfig.create("int4"), QuantConfig.create("int4", group_size=128, scheme="asym"),
           QuantConfig.create("int8"), QuantConfig.create("int4", embedding_bits=16, lm_head_bits=16)]
TOKENS = [1, 17, 99, 250, 3, 77, 411, 8, 8, 120, 64, 301]


def logits_of(model_dir, quant, backend=None, dtype=torch.float32, quant_activations="exact"):
    arch = load_arch_config(model_dir)
    model = load_model(model_dir, arch, dtype, "cpu", progress=False, quantization=quant, kernel_backend=backend,
                       quant_activations=quant_activations)
    kv_caches = allocate_kv_caches(arch, 4, 16, dtype, "cpu")
    # A prefill chunk, then single-token decode steps (the batch-1 kernel path).
    return model, run_schedule(model, kv_caches, [TOKENS], [[0, 1, 2, 3]], [[8, 1, 1, 1, 1]], 16)[0]


@pytest.mark.parametrize("quant", CONFIGS, ids=lambda q: f"{q.name}-head{q.lm_head_bits}")
def test_quantized_model_kernels_match_the_dequantize_oracle(cpu_ops, tiny_llama, quant):
    _, ours = logits_of(tiny_llama, quant, "cpu")
    _, oracle = logits_of(tiny_llama, quant, "reference")
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    _, dense = logits_of(tiny_llama, None)
    assert not torch.equal(ours, dense)  # it really is quantized
    assert torch.nn.functional.cosine_similarity(ours, dense, dim=-1).min() > 0.9  # and close to the 16-bit model


@pytest.mark.parametrize("quant", CONFIGS[:2] + CONFIGS[3:], ids=lambda q: f"{q.name}-head{q.lm_head_bits}")
def test_int8_activation_path_matches_its_oracle(cpu_ops, tiny_llama, quant):
    if not cpu_ops.has_vnni_path():
        pytest.skip("this CPU lacks AVX512-VNNI")
    model, ours = logits_of(tiny_llama, quant, "cpu", quant_activations="int8")
    assert any(getattr(m, "int4_x16", False) for m in model.modules())  # the VNNI kernel really ran
    _, oracle = logits_of(tiny_llama, quant, "reference", quant_activations="int8")
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    _, exact = logits_of(tiny_llama, quant, "cpu")
    assert not torch.equal(ours, exact)  # activations really were rounded
    assert torch.nn.functional.cosine_similarity(ours, exact, dim=-1).min() > 0.99


@pytest.mark.parametrize("family", ["tiny_tied", "tiny_qwen2"])
def test_tied_and_biased_families(cpu_ops, family, request):
    model_dir = request.getfixturevalue(family)
    quant = QuantConfig.create("int4", group_size=64)
    model, ours = logits_of(model_dir, quant, "cpu")
    _, oracle = logits_of(model_dir, quant, "reference")
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    if family == "tiny_tied":
        assert model.lm_head.qweight is model.model.embed_tokens.qweight  # one INT8 table, shared
        assert model.model.embed_tokens.qweight.dtype == torch.int8


def test_quantized_weights_are_smaller(tiny_llama):
    dense, _ = logits_of(tiny_llama, None, "reference")
    int4, _ = logits_of(tiny_llama, QuantConfig.create("int4"), "reference")

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert nbytes(int4) < 0.25 * nbytes(dense)  # fp32 -> ~4.5 bits per projection weight, int8 embedding/head


@pytest.mark.parametrize("quant", CONFIGS[:3], ids=lambda q: q.name)
def test_quantize_save_load_round_trip_is_bit_identical(cpu_ops, tiny_llama, tmp_path, quant):
    out = quantize_checkpoint(tiny_llama, tmp_path / "q", quant, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert QuantConfig.from_json(config["quantization_config"]) == quant
    assert (out / "tokenizer.model").is_file()
    # The file holds exactly what quantizing at load produces ...
    from frugal.model.loader import iterate_weights, safetensors_files
    from frugal.quant.base import quantize_stream

    expected = dict(quantize_stream(iterate_weights(safetensors_files(tiny_llama), progress=False), quant, False))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(expected)
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), expected[name]), name
    # ... so loading it is bit-identical to quantizing at load, with no quantization argument needed.
    _, from_file = logits_of(out, None, "cpu")
    _, at_load = logits_of(tiny_llama, quant, "cpu")
    assert torch.equal(from_file, at_load)


def test_quantized_checkpoint_errors(tiny_llama, tmp_path):
    out = quantize_checkpoint(tiny_llama, tmp_path / "q", QuantConfig.create("int4"), progress=False)
    arch = load_arch_config(out)
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(out, arch, torch.float32, "cpu", progress=False, quantization=QuantConfig.create("int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", QuantConfig.create("int8"), progress=False)
    with pytest.raises(ConfigError, match="not empty"):
        quantize_checkpoint(tiny_llama, out, QuantConfig.create("int8"), progress=False)
    with pytest.raises(ConfigError, match="must differ"):
        quantize_checkpoint(tiny_llama, tiny_llama, QuantConfig.create("int8"), progress=False)


@pytest.mark.parametrize("quantization,quant_activations", [("int4", "int8"), ("int4", "exact"), ("int8", "int8")])
def test_greedy_output_is_stable_across_runs_and_batch_sizes(cpu_ops, tiny_llama, quantization, quant_activations):
    from frugal import LLM, SamplingParams

    llm = LLM(str(tiny_llama), quantization=quantization, kv_cache_memory="16MiB", max_model_len=128,
              quant_activations=quant_activations)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[1, 5, 9, 200, 31], [1, 400, 2, 7], [1, 11, 12, 13, 14, 15, 16, 17], [1, 300]]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert alone == batched == again
    assert all(len(tokens) == 12 for tokens in alone)


@pytest.mark.parametrize("quant_activations", ["exact", "int8"])
def test_int4_embedding_and_lm_head(cpu_ops, tiny_llama, tiny_tied, tmp_path, quant_activations):
    quant = QuantConfig.create("int4", embedding_bits=4, lm_head_bits=4)
    assert quant.name == "int4-g32-sym-emb4-head4"
    model, ours = logits_of(tiny_llama, quant, "cpu", quant_activations=quant_activations)
    _, oracle = logits_of(tiny_llama, quant, "reference", quant_activations=quant_activations)
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    assert model.lm_head.qweight.dtype == torch.uint8 and model.model.embed_tokens.qweight.dtype == torch.uint8
    _, int8_head = logits_of(tiny_llama, QuantConfig.create("int4"), "cpu", quant_activations=quant_activations)
    assert torch.nn.functional.cosine_similarity(ours, int8_head, dim=-1).min() > 0.95  # random tiny weights
    # The embedding dequantises exactly the rows it is asked for.
    from frugal.quant.int4 import dequantize_int4

    table = model.model.embed_tokens
    ids = torch.tensor([3, 0, 3, 250])
    expected = dequantize_int4(table.qweight, table.scales, None, 32, table.hidden_size)[ids]
    torch.testing.assert_close(table(ids), expected)
    # A quantized checkpoint carries it, and loads to the same logits.
    out = quantize_checkpoint(tiny_llama, tmp_path / "q", quant, progress=False)
    _, from_file = logits_of(out, None, "cpu", quant_activations=quant_activations)
    assert torch.equal(from_file, ours)
    with pytest.raises(ConfigError, match="tied"):
        logits_of(tiny_tied, quant, "cpu")
    with pytest.raises(ConfigError, match="tied"):
        quantize_checkpoint(tiny_tied, tmp_path / "tied", quant, progress=False)
    with pytest.raises(ConfigError, match="bits=4"):
        QuantConfig.create("int8", lm_head_bits=4)
