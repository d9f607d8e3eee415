"""The same engine on CUDA (skipped without a GPU): greedy tokens match the CPU run and HF."""

from __future__ import annotations

import pytest
import torch

from frugal import LLM, SamplingParams
from tiny_models import load_hf, make_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_greedy_matches_hf(tmp_path, family):
    model_dir = make_tiny_checkpoint(tmp_path / family, family)
    hf = load_hf(model_dir)
    llm = LLM(str(model_dir), dtype="float32", device="cuda", kv_cache_memory="16MiB")
    prompt = [1] + list(range(40, 80))
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert output.outputs[0].token_ids == expected


def test_cuda_matches_cpu_on_real_weights(stories260k):
    params = SamplingParams(temperature=0.0, max_tokens=48)
    prompts = [[1], [1, 403, 407, 260], "Once upon a time"]
    cpu = [o.outputs[0].token_ids for o in LLM(str(stories260k), kv_cache_memory="8MiB").generate(prompts, params)]
    llm = LLM(str(stories260k), device="cuda", kv_cache_memory="8MiB")
    cuda = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert cuda == cpu
    assert llm.engine.scheduler.num_used_blocks == 0
