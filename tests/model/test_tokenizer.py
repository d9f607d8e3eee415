"""Tokenizer parity with transformers on real tokenizer files, BOS rules, loading errors, and
generation_config.json defaults.

The HF reference is `AutoTokenizer.from_pretrained(dir)`. (In transformers 5, `LlamaTokenizer(vocab_file=...)`
no longer reads the SentencePiece model and `LlamaTokenizer.from_pretrained` applies the non-legacy
space rule; AutoTokenizer converts the .model file with the legacy rule, which matches sentencepiece
itself and therefore how these models were trained. It adds no BOS without a tokenizer_config.json,
so BOS is checked separately against HF LlamaTokenizer's documented default, add_bos_token=True.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugal.errors import ModelLoadError
from frugal.model.generation_config import load_generation_defaults
from frugal.model.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
STORIES = SHARED / "models" / "stories260K"
LLAMA2 = SHARED / "models" / "tokenizers" / "llama2-sentencepiece-32k"
QWEN = SHARED / "models" / "tokenizers" / "qwen2.5-bpe"
ALL_DIRS = {"stories260K": STORIES, "llama2": LLAMA2, "qwen2.5": QWEN}

TEXTS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "a\nb\n\n c\t\td",
    "\n\nstarts with newlines",
    "héllo wörld ça va",
    "世界你好，こんにちは",
    "emoji 😀👍🏽 and family 👨‍👩‍👧",
    "",
    " ",
    "x  y   z",
    "<s>hi</s> and <unk> inline",
    "Hello <|im_start|>user\nhi<|im_end|>",
    "code: def f(x):\n    return x ** 2  # ok",
    "numbers 1234567890 3.14159",
]


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="module", params=list(ALL_DIRS))
def pair(request):
    """(our tokenizer, HF AutoTokenizer) for one real tokenizer directory."""
    transformers = pytest.importorskip("transformers")
    model_dir = _require(ALL_DIRS[request.param])
    return load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(pair, text):
    ours, hf = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_random_text_roundtrip_and_parity(pair, text):
    ours, hf = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_special_ids_and_vocab_match_hf(pair):
    ours, hf = pair
    assert ours.all_special_ids == frozenset(hf.all_special_ids)
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.eos_token == hf.eos_token


def test_decode_with_special_tokens_in_the_middle(pair):
    ours, hf = pair
    ids = ours.encode("Hello world", add_special_tokens=False)
    special = sorted(ours.all_special_ids)[:2]
    mixed = [special[0], *ids[:1], special[-1], *ids[1:]]
    for skip in (True, False):
        assert ours.decode(mixed, skip_special_tokens=skip) == hf.decode(mixed, skip_special_tokens=skip)


@pytest.mark.parametrize("model_dir", [STORIES, LLAMA2])
def test_sentencepiece_adds_bos_like_llama_tokenizer(model_dir):
    tok = load_tokenizer(_require(model_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.bos_token, tok.eos_token) == (1, 2, "<s>", "</s>")
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == [1, *plain]
    assert tok.encode("") == [1]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.decode(tok.encode("Hello world"), skip_special_tokens=False) == "<s> Hello world"


def test_sentencepiece_matches_sentencepiece_per_segment():
    spm = pytest.importorskip("sentencepiece")
    model_dir = _require(LLAMA2)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tok = load_tokenizer(model_dir)
    for text in TEXTS:
        if "<" not in text:
            assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]
    # special-token text is split out, each remaining segment encoded on its own (HF legacy rule)
    assert tok.encode("<s>x</s> y", add_special_tokens=False) == [1, *sp.encode("x"), 2, *sp.encode(" y")]


def test_qwen_has_no_bos_and_config_special_flags_win():
    tok = load_tokenizer(_require(QWEN))
    assert tok.bos_token_id is None and tok.bos_token is None
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False) == [9707]
    assert tok.pad_token_id == 151643
    # tokenizer.json marks <tool_call> special; tokenizer_config.json says it is not (HF follows the config)
    tool_call = tok.token_to_id("<tool_call>")
    assert tool_call not in tok.all_special_ids
    assert tok.decode([9707, tool_call, 151645]) == "Hello<tool_call>"


def test_add_bos_token_from_config_for_tokenizer_json(tmp_path):
    model_dir = _require(QWEN)
    (tmp_path / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # The file has no post-processor, so add_bos_token decides (HF 4.x LlamaTokenizerFast and vLLM;
    # transformers 5.x ignores add_bos_token from tokenizer_config.json altogether).
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello") == [151643, 9707]
    assert tok.encode("Hello", add_special_tokens=False) == [9707]


def test_ids_fall_back_to_config_json(tmp_path):
    model_dir = _require(QWEN)
    (tmp_path / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    config = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 9707}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (151643, 151645, 9707)
    assert tok.bos_token == "<|endoftext|>" and tok.pad_token == "Hello"
    # an id known only from config.json does not make an ordinary token special
    assert 9707 not in tok.all_special_ids and tok.decode([9707]) == "Hello"


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_garbled_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(_require(STORIES) / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_chat_template_sources(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(_require(STORIES) / "tokenizer.model")
    assert load_tokenizer(tmp_path).chat_template is None
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert load_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_tokenizer(tmp_path).chat_template == "J"


# ---- generation_config.json -------------------------------------------------------------------


def test_generation_defaults_absent_file(tmp_path):
    defaults = load_generation_defaults(tmp_path, arch_eos=2)
    assert defaults.eos_token_ids == frozenset({2}) and defaults.sampling_defaults == {}


def test_generation_defaults_read(tmp_path):
    config = {"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8, "top_k": 20,
              "repetition_penalty": 1.05, "max_new_tokens": 512, "do_sample": True, "bos_token_id": 151643}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    defaults = load_generation_defaults(tmp_path, arch_eos=[151643, 7])
    assert defaults.eos_token_ids == frozenset({151645, 151643, 7})
    assert defaults.sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                          "repetition_penalty": 1.05, "max_tokens": 512}
    assert defaults.bos_token_id == 151643


def test_generation_defaults_only_present_keys(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6}))
    defaults = load_generation_defaults(tmp_path, arch_eos=None)
    assert defaults.eos_token_ids == frozenset({2}) and defaults.sampling_defaults == {"temperature": 0.6}


@pytest.mark.parametrize("content", ["{garbled", "[1, 2]", '{"top_p": 0}', '{"eos_token_id": "x"}'])
def test_generation_defaults_bad_file(tmp_path, content):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        load_generation_defaults(tmp_path, arch_eos=2)
