"""GPTQ: error compensation beats round-to-nearest on correlated inputs; the calibrated checkpoint has the
canonical format and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from frugal.errors import ConfigError
from frugal.quant.config import QuantConfig
from frugal.quant.convert import quantize_checkpoint
from frugal.quant.gptq import CalibrationConfig, HessianAccumulator, calibration_windows, gptq_quantize_weight
from frugal.quant.int4 import dequantize_int4, quantize_int4
from frugal.quant.int8 import dequantize_int8, quantize_int8

WIKITEXT_VALID = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2_valid_test" / "valid.txt"


def _correlated_inputs(num_rows=512, in_features=128):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(in_features, in_features, generator=generator)
    scales = torch.logspace(0, -2, in_features)  # a few dominant directions, as real activations have
    return torch.randn(num_rows, in_features, generator=generator) @ (mixing * scales[:, None])


@pytest.mark.parametrize("config", [QuantConfig.create("int4"), QuantConfig.create("int4", group_size=128, scheme="asym"),
                                    QuantConfig.create("int8")], ids=lambda c: c.name)
def test_gptq_output_error_is_below_round_to_nearest(config):
    x = _correlated_inputs()
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    accumulator = HessianAccumulator(128)
    accumulator(None, (x,))
    tensors, dequant = gptq_quantize_weight(weight, accumulator.hessian, config, damp=0.01)
    if config.bits == 4:
        rtn = quantize_int4(weight, config.group_size, config.scheme)
        rtn_weight = dequantize_int4(rtn.qweight, rtn.scales, rtn.qzeros, config.group_size, 128)
        assert set(tensors) == set(rtn.tensors())
        stored = dequantize_int4(tensors["qweight"], tensors["scales"], tensors.get("qzeros"), config.group_size, 128)
    else:
        rtn = quantize_int8(weight)
        rtn_weight = dequantize_int8(rtn.qweight, rtn.scales)
        stored = dequantize_int8(tensors["qweight"], tensors["scales"])
    assert torch.equal(stored, dequant)  # the packed tensors hold exactly the weights GPTQ chose
    for key, tensor in tensors.items():
        assert tensor.dtype == rtn.tensors()[key].dtype and tensor.shape == rtn.tensors()[key].shape
    gptq_error = (x @ (weight - dequant).T).pow(2).mean()
    rtn_error = (x @ (weight - rtn_weight).T).pow(2).mean()
    assert gptq_error < 0.8 * rtn_error


def test_calibration_windows_are_seeded_and_start_with_bos(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("x")
    config = CalibrationConfig(text, num_samples=3, seq_len=5, seed=7)
    windows = calibration_windows(list(range(10, 60)), config, bos_token_id=1)
    assert windows.shape == (3, 5) and (windows[:, 0] == 1).all()
    assert torch.equal(windows, calibration_windows(list(range(10, 60)), config, bos_token_id=1))
    with pytest.raises(ConfigError, match="fewer than one window"):
        calibration_windows([5, 6], config, bos_token_id=1)
    with pytest.raises(ConfigError, match="not a file"):
        CalibrationConfig(tmp_path / "missing.txt")


def test_gptq_checkpoint_of_a_real_model_loads(stories260k, tmp_path):
    if not WIKITEXT_VALID.is_file():
        pytest.skip("wikitext2 not present")
    quant = QuantConfig.create("int4", method="gptq")
    calibration = CalibrationConfig(WIKITEXT_VALID, num_samples=2, seq_len=64)
    out = quantize_checkpoint(stories260k, tmp_path / "gptq", quant, calibration, progress=False)
    rtn = quantize_checkpoint(stories260k, tmp_path / "rtn", QuantConfig.create("int4"), progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(rtn / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        differs = 0
        for name in f.keys():
            a, b = f.get_tensor(name), g.get_tensor(name)
            assert a.shape == b.shape and a.dtype == b.dtype, name
            differs += int(not torch.equal(a, b))
        assert differs > 0
    from frugal import LLM, SamplingParams

    llm = LLM(str(out), kv_cache_memory="16MiB")
    text = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0].text
    assert len(text.split()) >= 3
