"""Our HF -> GGUF converter, checked by llama.cpp itself (skipped without llama-cpp-python / gguf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from frugal.bench.gguf_convert import convert_to_gguf, permute_rope_rows, quantize_gguf  # noqa: E402
from frugal.bench.llama_cpp_runner import measure, sequence_logits  # noqa: E402

TOKENS = [1] + list(range(300, 330))


def test_rope_permutation_interleaves_halves():
    rows = torch.arange(8.0)[:, None]  # one head of dim 8: rotate-half pairs (0,4), (1,5), ...
    assert permute_rope_rows(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_f32_conversion_matches_the_reference_gguf_and_our_model(stories260k, tmp_path):
    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import load_model
    from frugal.runner.kv_cache import allocate_kv_caches
    from model.helpers import run_schedule

    path = convert_to_gguf(stories260k, tmp_path / "s.gguf", "F32")
    ours_in_llama = sequence_logits(str(path), TOKENS)
    reference = stories260k / "gguf" / "stories260K-f32.gguf"  # made by llama.cpp's own converter
    if reference.is_file():
        assert np.array_equal(ours_in_llama, sequence_logits(str(reference), TOKENS))
    arch = load_arch_config(stories260k)
    model = load_model(stories260k, arch, torch.float32, "cpu", progress=False)
    caches = allocate_kv_caches(arch, 4, 16, torch.float32, "cpu")
    frugal_logits = run_schedule(model, caches, [TOKENS], [[0, 1, 2, 3]], [[len(TOKENS)]], 16)[0].numpy()
    assert np.abs(ours_in_llama - frugal_logits).max() < 0.1  # llama.cpp's own arithmetic differs slightly
    assert (ours_in_llama.argmax(-1) == frugal_logits.argmax(-1)).mean() >= 0.9


def test_quantize_and_measure_with_llama_cpp(stories260k, tmp_path):
    f16 = convert_to_gguf(stories260k, tmp_path / "s-f16.gguf", "F16")
    q8 = quantize_gguf(f16, tmp_path / "s-q8.gguf", "Q8_0", threads=1)
    assert q8.stat().st_size < f16.stat().st_size
    row = measure(str(q8), TOKENS, gen_len=6, repeats=1, threads=1)
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and len(row["output_token_ids"]) == 6
    with pytest.raises(ValueError, match="no file type"):
        quantize_gguf(f16, tmp_path / "x.gguf", "Q9_9")


def test_bpe_vocabulary_converts(tmp_path):
    pytest.importorskip("tokenizers")
    from frugal.bench.shapes import write_bpe_tokenizer_from_gguf
    from frugal.model.tokenizer import load_tokenizer
    from tiny_models import SHARED

    vocab = SHARED / "models" / "tokenizers" / "llama.cpp-vocab-gguf" / "ggml-vocab-starcoder.gguf"
    if not vocab.is_file():
        pytest.skip("starcoder vocabulary not present")
    write_bpe_tokenizer_from_gguf(vocab, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.vocab_size == 49152
    text = "def add(a, b):\n    return a + b"
    assert tokenizer.decode(tokenizer.encode(text)) == text
