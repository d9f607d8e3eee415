"""Quantization on the zoo's other MLP shapes: a ReGLU (relu) Llama and a Mixtral MoE (router and every
expert are Linear layers, so INT4/INT8 apply to them unchanged). Kernels match the dequantise oracle,
stay close to the 16-bit model, and a `frugal quantize` checkpoint loads bit-identically."""

from __future__ import annotations

import pytest
import torch

from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.quant.config import QuantConfig
from frugal.quant.convert import quantize_checkpoint
from frugal.runner.kv_cache import allocate_kv_caches
from model.helpers import run_schedule

TOKENS = [1, 17, 99, 250, 3, 77, 411, 8, 8, 120, 64, 301]


@pytest.fixture(scope="module", params=["llama_relu", "mixtral"])
def family_checkpoint(request, tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def logits_of(model_dir, quant, backend=None, dtype=torch.float32):
    arch = load_arch_config(model_dir)
    model = load_model(model_dir, arch, dtype, "cpu", progress=False, quantization=quant, kernel_backend=backend)
    kv_caches = allocate_kv_caches(arch, 4, 16, dtype, "cpu")
    return run_schedule(model, kv_caches, [TOKENS], [[0, 1, 2, 3]], [[8, 1, 1, 1, 1]], 16)[0]  # prefill + decodes


# Minimum cosine to the 16-bit logits. The tiny random checkpoints (weights x4) amplify INT4 rounding, and
# in the MoE a perturbed hidden state also changes later layers' expert choices (measured: llama_relu 0.95,
# mixtral 0.80 at int4-g32; >= 0.999 at int8); unrelated logits would score ~0.
MIN_COSINE = {"int4-g32-sym": 0.7, "int8": 0.99}


@pytest.mark.parametrize("quant", [QuantConfig.create("int4", group_size=32), QuantConfig.create("int8")],
                         ids=lambda q: q.name)
def test_kernels_match_oracle_and_stay_close_to_dense(cpu_ops, family_checkpoint, quant):
    ours = logits_of(family_checkpoint, quant, "cpu")
    oracle = logits_of(family_checkpoint, quant, "reference")
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    dense = logits_of(family_checkpoint, None)
    assert not torch.equal(ours, dense)
    assert torch.nn.functional.cosine_similarity(ours, dense, dim=-1).min() > MIN_COSINE[quant.name]


def test_moe_router_stays_16_bit(family_checkpoint):
    arch = load_arch_config(family_checkpoint)
    model = load_model(family_checkpoint, arch, torch.float32, "cpu", progress=False,
                       quantization=QuantConfig.create("int4", group_size=32), kernel_backend="reference")
    mlp = model.model.layers[0].mlp
    if arch.num_local_experts:
        assert mlp.gate.weight.dtype == torch.float32 and not hasattr(mlp.gate, "qweight")
        assert all(hasattr(e.gate_up_proj, "qweight") and hasattr(e.down_proj, "qweight") for e in mlp.experts)
    else:
        assert hasattr(mlp.gate_up_proj, "qweight") and hasattr(mlp.down_proj, "qweight")


def test_bfloat16_kernel_path_close_to_float32(cpu_ops, family_checkpoint):
    bf16 = logits_of(family_checkpoint, None, "cpu", torch.bfloat16)
    fp32 = logits_of(family_checkpoint, None)
    assert bf16.dtype == torch.float32  # the LM head returns float32 logits
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=-1).min() > 0.99


def test_quantized_checkpoint_round_trip(cpu_ops, family_checkpoint, tmp_path):
    quant = QuantConfig.create("int4", group_size=32)
    out = quantize_checkpoint(family_checkpoint, tmp_path / "q", quant, progress=False)
    assert torch.equal(logits_of(out, None, "cpu"), logits_of(family_checkpoint, quant, "cpu"))


def test_gptq_refuses_moe(tmp_path):
    from frugal.errors import ConfigError
    from frugal.quant.gptq import CalibrationConfig
    from tiny_models import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "mixtral", "mixtral")
    data = tmp_path / "calib.txt"
    data.write_text("Once upon a time there was a tiny model. " * 50)
    with pytest.raises(ConfigError, match="does not support mixture-of-experts"):
        quantize_checkpoint(model_dir, tmp_path / "q", QuantConfig.create("int4", method="gptq"),
                            calibration=CalibrationConfig(data), progress=False)
