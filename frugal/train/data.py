"""Training text -> one token stream -> train/validation split -> deterministic batches.

- A *document* is one file, or one line's "text" of a `.jsonl` file. Files are read as UTF-8, falling
  back to Latin-1 for files that are not (some NLTK corpora are ISO-8859-1); CRLF becomes LF.
- The stream is `<s> doc </s> <s> doc </s> ...`, cached on disk as a `.npy` keyed by the tokenizer
  and the files' paths, sizes and modification times.
- The stream is cut into blocks of `val_block_tokens`; every `val_every`-th block is validation and is
  never trained on.
- `BatchSampler.batch(step, micro)` depends only on (seed, step, micro): a resumed run sees exactly
  the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frugal.errors import ConfigError

logger = logging.getLogger(__name__)

_SKIPPED_NAMES = ("README",)


def expand_data_paths(patterns: list[str] | tuple[str, ...]) -> list[Path]:
    """Files named by `patterns` (files, directories searched recursively, or globs), sorted within
    each pattern, in pattern order, without duplicates. Files named README* under a directory are
    skipped. Raises ConfigError for a pattern that matches nothing."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(_SKIPPED_NAMES))
        else:
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matched:
            raise ConfigError(f"training data {pattern!r} matches no file")
        files.extend(p for p in matched if p not in files)
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n")


def read_documents(path: Path) -> Iterator[str]:
    """The documents in one file (see the module docstring)."""
    try:
        text = _read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read training file {path}: {exc}") from exc
    if path.suffix != ".jsonl":
        if text.strip():
            yield text
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{line_no}: expected a JSON object with a 'text' string ({exc})") from exc
        if isinstance(doc, str) and doc.strip():
            yield doc.replace("\r\n", "\n")


def _cache_key(files: list[Path], tokenizer_json: Path) -> str:
    digest = hashlib.sha256(tokenizer_json.read_bytes())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "frugal" / "train_tokens"


def tokenize_files(files: list[Path], tokenizer_dir: Path, cache_dir: Path | None = None) -> np.ndarray:
    """The token stream of `files` (see the module docstring). [num_tokens] uint16 (uint32 when the
    vocabulary does not fit)."""
    from tokenizers import Tokenizer

    from frugal.train.tokenizer import BOS_ID, EOS_ID

    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache_dir / f"{_cache_key(files, tokenizer_json)}.npy"
    if cache_path.is_file():
        logger.info("token stream from cache %s", cache_path)
        return np.load(cache_path, mmap_mode="r")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
    pieces: list[np.ndarray] = []
    for path in files:
        for doc in read_documents(path):
            lines = doc.splitlines(keepends=True)
            # Encode ~64 KiB chunks cut at line ends, in parallel (the library's thread pool).
            chunks, current, size = [], [], 0
            for line in lines:
                current.append(line)
                size += len(line)
                if size >= 1 << 16:
                    chunks.append("".join(current))
                    current, size = [], 0
            if current:
                chunks.append("".join(current))
            encodings = tokenizer.encode_batch(chunks, add_special_tokens=False)
            ids = [BOS_ID] + [i for enc in encodings for i in enc.ids] + [EOS_ID]
            pieces.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(pieces)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache_path)
    logger.info("tokenized %d file(s): %d tokens (cached at %s)", len(files), len(tokens), cache_path)
    return tokens


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # [num_train_tokens]
    val: np.ndarray    # [num_val_tokens]


def split_train_val(tokens: np.ndarray, val_every: int, val_block_tokens: int) -> TokenSplits:
    """Every `val_every`-th block of `val_block_tokens` tokens (blocks val_every-1, 2*val_every-1, ...)
    goes to validation. A stream shorter than `val_every` blocks still gives one validation block:
    the last one."""
    num_blocks = -(-len(tokens) // val_block_tokens)
    if num_blocks < 2:
        raise ConfigError(f"training data has only {len(tokens)} tokens: too little to split off validation "
                          f"blocks of {val_block_tokens} tokens")
    val_ids = set(range(val_every - 1, num_blocks, val_every)) or {num_blocks - 1}
    blocks = [tokens[i * val_block_tokens:(i + 1) * val_block_tokens] for i in range(num_blocks)]
    train = np.concatenate([b for i, b in enumerate(blocks) if i not in val_ids])
    val = np.concatenate([b for i, b in enumerate(blocks) if i in val_ids])
    return TokenSplits(train=train, val=val)


class BatchSampler:
    """Random windows of `seq_len + 1` tokens from the training stream; fixed windows for validation."""

    def __init__(self, splits: TokenSplits, seq_len: int, batch_size: int, seed: int) -> None:
        if len(splits.train) <= seq_len + 1:
            raise ConfigError(f"training split has {len(splits.train)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.train = torch.from_numpy(np.asarray(splits.train, dtype=np.int64))
        self.val = torch.from_numpy(np.asarray(splits.val, dtype=np.int64))
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len]; targets are inputs shifted by one token."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + micro)
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (self.batch_size,), generator=generator)
        windows = torch.stack([self.train[s:s + self.seq_len + 1] for s in starts.tolist()])  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]

    def num_val_windows(self) -> int:
        return (len(self.val) - 1) // self.seq_len

    def val_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping validation windows, `batch_size` per batch: all of them, or with
        `max_batches` that many batches of windows spread evenly over the whole split."""
        num_windows = self.num_val_windows()
        rows = list(range(num_windows))
        if max_batches is not None and max_batches * self.batch_size < num_windows:
            wanted = max_batches * self.batch_size
            rows = [i * num_windows // wanted for i in range(wanted)]
        for first in range(0, len(rows), self.batch_size):
            chosen = rows[first:first + self.batch_size]
            windows = torch.stack([self.val[r * self.seq_len:r * self.seq_len + self.seq_len + 1] for r in chosen])
            yield windows[:, :-1], windows[:, 1:]
