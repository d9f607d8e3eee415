"""IncrementalDetokenizer: deltas concatenate to the full decode, no partial UTF-8 characters, stop
strings cut exactly and never retract streamed text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugal.engine.detokenizer import IncrementalDetokenizer
from frugal.model.tokenizer import load_tokenizer
from frugal.sampling_params import SamplingParams

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DIRS = {
    "stories260K": SHARED / "models" / "stories260K",
    "llama2": SHARED / "models" / "tokenizers" / "llama2-sentencepiece-32k",
    "qwen2.5": SHARED / "models" / "tokenizers" / "qwen2.5-bpe",
}
_CACHE: dict[str, object] = {}


def _tokenizer(name: str):
    if name not in _CACHE:
        if not DIRS[name].exists():
            pytest.skip(f"{DIRS[name]} not available")
        _CACHE[name] = load_tokenizer(DIRS[name])
    return _CACHE[name]


def _stream(tok, prompt_ids, output_ids, params, chunks=None):
    """Feed output_ids (in the given chunk sizes, default one by one); return (deltas, detok)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, i = [], 0
    for size in chunks or [1] * len(output_ids):
        if i >= len(output_ids):
            break
        deltas.append(detok.update(output_ids[i:i + size]))
        i += size
    if i < len(output_ids):
        deltas.append(detok.update(output_ids[i:]))
    if detok.stop_matched is None:
        deltas.append(detok.finish())
    return deltas, detok


def _random_ids(tok, data, max_len=40):
    specials = tok.all_special_ids
    # Bias towards low ids: in SentencePiece vocabularies these are the byte-fallback tokens.
    ids = data.draw(st.lists(
        st.one_of(st.integers(0, min(tok.vocab_size, 300) - 1), st.integers(0, tok.vocab_size - 1))
        .filter(lambda i: i not in specials), max_size=max_len))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=max_len))
    return ids, chunks


@pytest.mark.parametrize("name", list(DIRS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_concatenated_deltas_equal_full_decode(name, data):
    tok = _tokenizer(name)
    ids, chunks = _random_ids(tok, data)
    prompt = [tok.bos_token_id] if tok.bos_token_id is not None else []
    deltas, detok = _stream(tok, prompt, ids, SamplingParams(), chunks)
    assert "".join(deltas) == tok.decode(ids) == detok.text


@pytest.mark.parametrize("name", list(DIRS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_deltas_continue_a_real_prompt(name, data):
    tok = _tokenizer(name)
    prompt = tok.encode("Once upon a time, 世界 there was")
    ids, chunks = _random_ids(tok, data)
    deltas, _ = _stream(tok, prompt, ids, SamplingParams(), chunks)
    prompt_text = tok.decode(prompt)
    full = tok.decode(prompt + ids)
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text):]


TEXTS = ["Hello 😀 world 👍🏽!", "世界你好，こんにちは。", "emoji at end 🎉", "mixed é 中 😀 ok", " leading space"]


@pytest.mark.parametrize("name", list(DIRS))
@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_never_emit_replacement_char(name, text):
    tok = _tokenizer(name)
    prompt = tok.encode("Start:")
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tok, prompt, ids, SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert text.strip() in detok.text


def test_byte_fallback_split_is_held_back():
    tok = _tokenizer("stories260K")
    ids = tok.encode("a😀b", add_special_tokens=False)
    byte_tokens = [t for t in tok.convert_ids_to_tokens(ids) if t.startswith("<0x")]
    assert len(byte_tokens) == 4  # the emoji is four byte-fallback tokens in this 512-piece vocabulary
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id], SamplingParams())
    emitted = [detok.update([t]) for t in ids]
    assert "".join(emitted) == "a😀b"
    assert "😀" in emitted  # the whole character appears in one delta, once its last byte arrives


def _stop_case(stop, include=False, text="Hello world. The end is near, world!"):
    tok = _tokenizer("llama2")
    ids = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    deltas, detok = _stream(tok, [tok.bos_token_id], ids, params)
    return "".join(deltas), detok, tok


def test_stop_string_across_token_boundaries():
    out, detok, _ = _stop_case(["o w"])
    assert out == "Hell" and detok.text == "Hell" and detok.stop_matched == "o w"


def test_stop_string_included():
    out, detok, _ = _stop_case([". The e"], include=True)
    assert out == "Hello world. The e" == detok.text
    assert detok.stop_matched == ". The e"


def test_earliest_stop_string_wins():
    out, detok, _ = _stop_case(["near", "The"])
    assert out == "Hello world. " and detok.stop_matched == "The"


def test_no_match_flushes_held_text_on_finish():
    tok = _tokenizer("llama2")
    ids = tok.encode("Hello wor", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id], SamplingParams(stop=["world"]))
    streamed = "".join(detok.update([t]) for t in ids)
    assert streamed == "Hello "          # "wor" could still become "world": held back
    assert detok.finish() == "wor"
    assert detok.text == "Hello wor" and detok.stop_matched is None
    assert detok.update(tok.encode("ld", add_special_tokens=False)) == ""  # finished: ignored


def test_held_text_released_when_it_stops_matching():
    tok = _tokenizer("llama2")
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id], SamplingParams(stop=["world"]))
    deltas = [detok.update([t]) for t in tok.encode("Hello wor and wo", add_special_tokens=False)]
    assert "".join(deltas) == "Hello wor and "  # "wor" released once " and" arrived; "wo" held
    assert detok.finish() == "wo"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_stop_strings_cut_exactly(data):
    tok = _tokenizer("qwen2.5")
    text = data.draw(st.text(st.sampled_from("ab c😀世\n"), min_size=1, max_size=30))
    full = tok.decode(tok.encode(text))
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start:start + data.draw(st.integers(1, 4))]
    include = data.draw(st.booleans())
    ids = tok.encode(text)
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    deltas, detok = _stream(tok, [], ids, SamplingParams(stop=[stop], include_stop_str_in_output=include), chunks)
    index = full.find(stop)
    expected = full[: index + len(stop)] if include else full[:index]
    assert "".join(deltas) == expected == detok.text
    assert detok.stop_matched == stop


def test_special_tokens_skipped_or_kept():
    tok = _tokenizer("qwen2.5")
    ids = tok.encode("Hi<|im_end|>there", add_special_tokens=False)
    skipped, _ = _stream(tok, [], ids, SamplingParams())
    kept, _ = _stream(tok, [], ids, SamplingParams(skip_special_tokens=False))
    assert "".join(skipped) == "Hithere"
    assert "".join(kept) == "Hi<|im_end|>there"


def test_sentencepiece_leading_space_of_first_output_token():
    tok = _tokenizer("llama2")
    prompt = tok.encode("Once upon a")
    output = tok.encode(" time there", add_special_tokens=False)[-2:]  # "▁time", "▁there"
    deltas, detok = _stream(tok, prompt, output, SamplingParams())
    assert deltas[:2] == [" time", " there"] and detok.text == " time there"
