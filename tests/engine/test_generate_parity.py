"""End to end through the engine: greedy generation equals HF transformers' `generate`, and the real
stories260K checkpoint reproduces its known text."""

from __future__ import annotations

import pytest
import torch

from frugal import LLM, SamplingParams
from tiny_models import FAMILIES, load_hf, make_tiny_checkpoint

STORIES_GREEDY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                  "One day, she saw a big, red ball. She wanted to play with it, but it was too high")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(tmp_path, family):
    model_dir = make_tiny_checkpoint(tmp_path / family, family)
    hf = load_hf(model_dir)
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")
    prompts = [[1, 5, 9, 200, 31, 7], [1] + list(range(40, 80))]  # shorter and longer than one block
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].finish_reason == "length"
    assert llm.engine.scheduler.num_used_blocks == 0


def test_stories260k_reproduces_known_text(stories260k):
    llm = LLM(str(stories260k), kv_cache_memory="8MiB")
    output = llm.generate([[1]], SamplingParams(temperature=0.0, max_tokens=60))[0]
    assert output.outputs[0].text.startswith(STORIES_GREEDY)


def test_stories260k_string_prompt_adds_bos(stories260k):
    llm = LLM(str(stories260k), kv_cache_memory="8MiB")
    output = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert output.prompt_token_ids[0] == 1
    assert output.prompt_token_ids == [1] + llm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    assert output.outputs[0].text
    metrics = output.metrics
    assert metrics.time_to_first_token > 0
    assert metrics.prefill_tokens_per_s > 0 and metrics.decode_tokens_per_s > 0
