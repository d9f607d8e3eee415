"""Training data: file discovery, decoding, the token stream, the validation split and batches."""

from __future__ import annotations

import numpy as np
import pytest

from frugal.errors import ConfigError
from frugal.train.data import BatchSampler, expand_data_paths, read_documents, split_train_val, tokenize_files
from frugal.train.tokenizer import BOS_ID, EOS_ID


def test_expand_paths(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.txt", "d/sub/b", "d/README", "c.txt"):
        (tmp_path / name).write_text("x")
    files = expand_data_paths([str(tmp_path / "d"), str(tmp_path / "*.txt"), str(tmp_path / "d/a.txt")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["d/a.txt", "d/sub/b", "c.txt"]
    with pytest.raises(ConfigError, match="nothing.txt"):
        expand_data_paths([str(tmp_path / "nothing.txt")])


def test_documents_latin1_crlf_and_jsonl(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\r\nline".encode("latin-1"))
    assert list(read_documents(latin)) == ["caf\u00e9\nline"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(read_documents(jsonl)) == ["one", "two"]
    jsonl.write_text('{"txt": "one"}\n')
    with pytest.raises(ConfigError, match="docs.jsonl:1"):
        list(read_documents(jsonl))


def test_token_stream_wraps_documents_and_is_cached(tmp_path, corpus_dir, zoo_tokenizer):
    files = expand_data_paths([str(corpus_dir)])
    tokens = tokenize_files(files, zoo_tokenizer, tmp_path)
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
    assert int((tokens == BOS_ID).sum()) == int((tokens == EOS_ID).sum()) == len(files) == 2
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert np.array_equal(tokenize_files(files, zoo_tokenizer, tmp_path), tokens)


def test_split_keeps_validation_out_of_training():
    tokens = np.arange(1000, dtype=np.uint32)
    splits = split_train_val(tokens, val_every=3, val_block_tokens=100)
    assert list(splits.val) == [*range(200, 300), *range(500, 600), *range(800, 900)]
    assert len(splits.train) + len(splits.val) == 1000 and not set(splits.train) & set(splits.val)
    with pytest.raises(ConfigError, match="too little"):
        split_train_val(tokens[:50], val_every=3, val_block_tokens=100)


def test_batches_depend_only_on_seed_and_step():
    splits = split_train_val(np.arange(5000, dtype=np.uint16), val_every=5, val_block_tokens=500)
    sampler = BatchSampler(splits, seq_len=16, batch_size=3, seed=7)
    inputs, targets = sampler.batch(step=4, micro=1)
    assert inputs.shape == targets.shape == (3, 16)
    assert (targets[:, :-1] == inputs[:, 1:]).all()
    again = BatchSampler(splits, seq_len=16, batch_size=3, seed=7).batch(step=4, micro=1)
    assert all((a == b).all() for a, b in zip((inputs, targets), again))
    assert not (sampler.batch(step=5, micro=1)[0] == inputs).all()
    val = list(sampler.val_batches())
    assert sum(len(x) for x, _ in val) == sampler.num_val_windows() == (1000 - 1) // 16
    assert set(torch_cat(val)).issubset(set(splits.val.tolist()))
    capped = list(sampler.val_batches(max_batches=2))  # 6 of the 62 windows, spread over the split
    assert [int(x[0, 0]) for b, _ in capped for x in b.split(1)] == [
        int(splits.val[16 * (i * 62 // 6)]) for i in range(6)]


def torch_cat(batches):
    return [int(t) for inputs, _ in batches for t in inputs.flatten()]
