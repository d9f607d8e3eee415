"""Train a byte-level BPE tokenizer (GPT-2 style, with the `tokenizers` library) and save it in the
Hugging Face layout: `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`.

Always true of a tokenizer made here:
- there is no normaliser and the 256 byte symbols are in the base alphabet, so every UTF-8 string
  encodes without unknown tokens and `decode(encode(text))` gives `text` back exactly;
- the special tokens are `<pad>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2, and the post-processor
  prepends BOS, so `transformers.AutoTokenizer` and `frugal.model.tokenizer` encode identically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from frugal.errors import ConfigError
from frugal.train.data import expand_data_paths, read_documents

logger = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _chunks(files: list[Path], chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Documents cut at line ends into pieces of about `chunk_chars` characters."""
    for path in files:
        for doc in read_documents(path):
            start = 0
            while start < len(doc):
                end = doc.find("\n", start + chunk_chars)
                end = len(doc) if end < 0 else end + 1
                yield doc[start:end]
                start = end


def train_tokenizer(data: list[str], vocab_size: int, out_dir: Path | str, min_frequency: int = 2,
                    model_max_length: int | None = None) -> Path:
    """Train on the files named by `data` (files, directories or globs) and write the tokenizer
    files into `out_dir`; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < _MIN_VOCAB:
        raise ConfigError(f"vocab size must be at least {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                          f"special tokens), got {vocab_size}")
    files = expand_data_paths(data)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    logger.info("training a %d-token byte-level BPE on %d file(s)", vocab_size, len(files))
    tokenizer.train_from_iterator(_chunks(files), trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}
            for t in SPECIAL_TOKENS},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    logger.info("wrote %s (vocab %d)", out_dir / "tokenizer.json", tokenizer.get_vocab_size())
    return out_dir


def check_tokenizer_dir(path: Path | str) -> Path:
    """`path` if it holds a tokenizer.json, else ConfigError naming it."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer.json in {path}; train one with `frugal train tokenizer`")
    return path
