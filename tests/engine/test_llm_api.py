"""The LLM API: streaming, stop strings, logprobs, chat, abort, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from frugal import LLM, InvalidRequestError, ModelLoadError, SamplingParams
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(stories260k):
    return LLM(str(stories260k), kv_cache_memory="8MiB")


GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def test_stream_deltas_add_up_to_generate(llm):
    expected = llm.generate("Once upon a time", GREEDY)[0].outputs[0]
    deltas = list(llm.stream("Once upon a time", GREEDY))
    assert "".join(d.text for d in deltas) == expected.text
    assert sum((d.token_ids for d in deltas), []) == expected.token_ids
    assert deltas[-1].finish_reason == expected.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_cuts_text(llm):
    full = llm.generate([[1]], GREEDY)[0].outputs[0].text  # "Once upon a time, there was a little girl named Lily..."
    stop = "little girl"
    assert stop in full
    output = llm.generate([[1]], GREEDY.clone(stop=[stop]))[0].outputs[0]
    assert output.text == full[: full.index(stop)]
    assert output.finish_reason == "stop" and output.stop_reason == stop
    kept = llm.generate([[1]], GREEDY.clone(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]
    assert llm.engine.scheduler.num_used_blocks == 0


def test_stop_token_id_and_min_tokens(llm):
    tokens = llm.generate([[1]], GREEDY)[0].outputs[0].token_ids
    stop_token = tokens[5]
    output = llm.generate([[1]], GREEDY.clone(stop_token_ids=[stop_token]))[0].outputs[0]
    assert output.token_ids == tokens[: tokens.index(stop_token) + 1]
    assert output.finish_reason == "stop" and output.stop_reason == stop_token


def test_logprobs_are_the_model_distribution(llm):
    output = llm.generate([[1, 100]], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5))[0].outputs[0]
    assert len(output.logprobs) == 3
    for token_id, entry in zip(output.token_ids, output.logprobs):
        assert entry[token_id].rank == 1  # greedy picks the most likely token
        assert len(entry) == 5
        assert sum(math.exp(lp.logprob) for lp in entry.values()) <= 1.0 + 1e-5
    assert output.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(output.token_ids, output.logprobs)))


def test_breaking_a_stream_aborts_and_frees_blocks(llm):
    stream = llm.stream([1, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert llm.engine.scheduler.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


def test_bad_input_raises_and_engine_keeps_working(llm):
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([[1] * 600], GREEDY)
    with pytest.raises(InvalidRequestError, match="token id"):
        llm.generate([[1, 99999]], GREEDY)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    # A bad prompt in a batch queues nothing.
    with pytest.raises(InvalidRequestError):
        llm.generate([[1, 2, 3], [1] * 600], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[1]], GREEDY)[0].outputs[0].text.startswith("Once upon a time")


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path / "does-not-exist"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))


def test_chat_applies_the_checkpoint_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir = make_tiny_checkpoint(tmp_path / "qwen", "qwen2", tokenizer="qwen")
    llm = LLM(str(model_dir), kv_cache_memory="8MiB")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    expected_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    output = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert output.prompt_token_ids == list(expected_ids)
    assert len(output.outputs[0].token_ids) == 5
