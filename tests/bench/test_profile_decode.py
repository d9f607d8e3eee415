"""`frugal bench decode --profile`: the native step's per-part split, and the eager one's."""

from __future__ import annotations

import json

import pytest

from frugal.bench.profile_decode import profile_decode
from frugal.cli.main import main
from frugal.quant.kernels import cpu_kernels
from tiny_models import make_tiny_checkpoint

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="frugal's CPU kernels are not available here")

NATIVE_PARTS = {"norms", "qkv_proj", "rotary + kv write", "attention", "o_proj", "gate_up_proj", "silu_and_mul",
                "down_proj", "lm_head"}


@needs_kernels
def test_native_profile_times_every_part_of_every_layer(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", seed=3)
    num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    result = profile_decode(str(path), quantization="int4", prompt_len=40, steps=6, threads=1)
    assert result["decode_path"] == "native"
    calls = result["calls_per_step"]
    assert set(calls) == NATIVE_PARTS
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "attention", "rotary + kv write"):
        assert calls[name] == num_layers
    assert calls["norms"] == 2 * num_layers + 1  # input and post-attention norms per layer, then the final one
    assert calls["lm_head"] == 1
    parts = result["ms_per_step"]
    assert all(ms > 0 for name, ms in parts.items() if name in NATIVE_PARTS)
    # The kernels' clocks run inside the Python-timed forward and logits calls, and those inside the step.
    assert parts["embedding + glue around the stack"] >= 0
    assert parts["rest (scheduler, sampler, detokeniser, Python)"] >= 0
    # Bytes per step: int4 projections read their packed weights and scales; attention the cached K/V.
    read = result["bytes_per_step"]
    assert read["qkv_proj"] > 0 and read["lm_head"] > 0 and read["attention"] > 0
    assert set(result["gb_per_s"]) == set(read)


def test_eager_profile_without_native_decode(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", seed=3)
    result = profile_decode(str(path), prompt_len=24, steps=4, threads=1, native_decode=False)
    assert result["decode_path"] == "eager"
    assert result["calls_per_step"]["attention"] > 0
    assert result["ms_per_step"]["rest (glue ops, Python, scheduler, sampler)"] >= 0


@needs_kernels
def test_profile_cli_writes_json_and_png(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", seed=3)
    out = tmp_path / "out"
    assert main(["bench", "decode", str(path), "--profile", "--prompt-len", "24", "--threads", "1",
                 "--out", str(out), "--name", "p"]) == 0
    result = json.loads((out / "p.json").read_text())
    assert result["decode_path"] == "native" and result["command"]
    assert (out / "p.png").stat().st_size > 0
