"""The zoo's byte-level BPE: any UTF-8 text round-trips, special ids are fixed, and transformers and
frugal's own tokenizer encode identically."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugal.errors import ConfigError
from frugal.model.tokenizer import load_tokenizer
from frugal.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

TEXTS = ["Once upon a time", "  leading spaces\n\ntabs\tand CRLF\r\n", "Ünïcödé — “quotes” 🤖 中文 ﷺ",
         "<s> a literal special token </s>", "", "a" * 300]


def test_files_and_special_tokens(zoo_tokenizer):
    config = json.loads((zoo_tokenizer / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    tokenizer = load_tokenizer(zoo_tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tokenizer.vocab_size == 512
    assert tokenizer.encode("To be")[0] == BOS_ID  # a prompt starts with BOS, as the models were trained
    assert tokenizer.all_special_ids == {PAD_ID, BOS_ID, EOS_ID}


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_text_round_trips(zoo_tokenizer_text_pair, text):
    raw, ours = zoo_tokenizer_text_pair
    ids = raw.encode(text, add_special_tokens=False).ids
    assert raw.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def zoo_tokenizer_text_pair(zoo_tokenizer):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(zoo_tokenizer / "tokenizer.json")), load_tokenizer(zoo_tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_encodes_identically(zoo_tokenizer, text):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer))
    ours = load_tokenizer(zoo_tokenizer)
    assert hf(text).input_ids == ours.encode(text)
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == ours.decode(ours.encode(text)) == text.replace(
        "<s>", "").replace("</s>", "")


def test_learns_merges_from_the_text(zoo_tokenizer, corpus_dir):
    ours = load_tokenizer(zoo_tokenizer)
    text = (corpus_dir / "part1.txt").read_text()[:2000]
    assert len(ours.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_bad_input_is_a_clear_error(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="vocab size"):
        train_tokenizer([str(corpus_dir)], 100, tmp_path / "t")
    with pytest.raises(ConfigError, match="matches no file"):
        train_tokenizer([str(tmp_path / "missing*.txt")], 512, tmp_path / "t")
    assert not (tmp_path / "t").exists()
