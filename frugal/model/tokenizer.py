"""Tokenizer: text <-> token ids for a checkpoint directory, matching Hugging Face's AutoTokenizer.

Two backends behind one class:
- `tokenizer.json` -> the `tokenizers` library (byte-level BPE, Metaspace BPE, ...): the file carries its
  normaliser, pre-tokeniser, added tokens, post-processor and decoder, so encoding and decoding are
  exactly HF's "fast" tokenizer.
- `tokenizer.model` alone -> `sentencepiece` with HF's legacy Llama rules: text is split on special /
  added token strings (so "<s>" in a prompt becomes the BOS id, as in HF), every other segment is
  encoded by SentencePiece (dummy-prefix space included), and BOS is prepended by default.

Always true: `decode(encode(text, add_special_tokens=False))` round-trips any text the vocabulary can
represent (byte fallback covers all text for Llama-style models); `all_special_ids` is the set that
`decode(..., skip_special_tokens=True)` drops; ids outside the vocabulary decode to nothing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from frugal.errors import ModelLoadError

logger = logging.getLogger(__name__)

_SPIECE_UNDERLINE = "\u2581"
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when the file is absent; ModelLoadError when it is garbled."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special-token entry is a string, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _first_id(value: Any) -> int | None:
    """config.json's bos/eos/pad_token_id may be an int or a list of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int):
        return value[0]
    return None


class _HFBackend:
    """`tokenizers.Tokenizer` from tokenizer.json."""

    def __init__(self, path: Path) -> None:
        import tokenizers

        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        self.special_ids = {
            tid for tid, tok in self.tk.get_added_tokens_decoder().items() if tok.special
        }
        self.has_post_processor = self.tk.post_processor is not None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id) or ""

    def encode(self, text: str, with_post_processor: bool) -> list[int]:
        return self.tk.encode(text, add_special_tokens=with_post_processor).ids

    def decode(self, ids: Sequence[int], skip_ids: frozenset[int]) -> str:
        # Filtered here rather than by the library: tokenizer_config.json may mark tokens that
        # tokenizer.json calls special as ordinary (HF honours the config), e.g. Qwen's <tool_call>.
        ids = [i for i in ids if i not in skip_ids] if skip_ids else list(ids)
        return self.tk.decode(ids, skip_special_tokens=False)


class _SPMBackend:
    """`sentencepiece` from tokenizer.model, with HF's (legacy) LlamaTokenizer encode/decode rules."""

    def __init__(self, path: Path, added_tokens: dict[int, str], legacy: bool) -> None:
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        self.num_pieces = self.sp.get_piece_size()
        self.legacy = legacy
        self.special_ids = {
            i for i in range(self.num_pieces) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        # Tokens matched as whole strings before SentencePiece sees the text: control/unknown pieces
        # ("<s>", "</s>", "<unk>") and every added token from tokenizer_config.json.
        self.added: dict[int, str] = {i: self.sp.id_to_piece(i) for i in self.special_ids}
        self.added.update(added_tokens)
        self.added_by_text = {text: tid for tid, text in self.added.items()}
        pattern = "|".join(re.escape(t) for t in sorted(self.added_by_text, key=len, reverse=True) if t)
        self.split_re = re.compile(f"({pattern})") if pattern else None
        self.anchor_id, self.anchor_text = self._find_anchor()
        unk = self.sp.unk_id()
        self.unk_prefix = self.sp.id_to_piece(unk) if unk >= 0 else None

    def _find_anchor(self) -> tuple[int | None, str]:
        """A piece decoding to one visible character: decoding `[anchor] + ids` and dropping the
        anchor's text keeps the leading space SentencePiece would strip at the start of a text."""
        for piece in ("<0x41>", "A", "a", "e", "t"):
            tid = self.sp.piece_to_id(piece)
            if tid != self.sp.unk_id() and not self.sp.is_control(tid):
                text = self.sp.decode([tid])
                if len(text) == 1 and not text.isspace():
                    return tid, text
        return None, ""

    @property
    def vocab_size(self) -> int:
        return max(self.num_pieces, max(self.added, default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_by_text:
            return self.added_by_text[token]
        tid = self.sp.piece_to_id(token)
        if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid):
            return None
        return tid

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id]
        if 0 <= token_id < self.num_pieces:
            return self.sp.id_to_piece(token_id)
        return ""

    def encode(self, text: str, with_post_processor: bool) -> list[int]:
        del with_post_processor  # BOS/EOS are added by Tokenizer from add_bos_token / add_eos_token
        segments = self.split_re.split(text) if self.split_re is not None else [text]
        ids: list[int] = []
        for index, segment in enumerate(segments):
            if not segment:
                continue
            if index % 2 == 1:  # odd positions are the captured added-token strings
                ids.append(self.added_by_text[segment])
            elif self.legacy or index == 0 or self.unk_prefix is None:
                ids.extend(self.sp.encode(segment))
            else:
                # HF's non-legacy rule: no dummy-prefix space after an added token.
                prefix_len = len(self.sp.encode(self.unk_prefix))
                ids.extend(self.sp.encode(self.unk_prefix + segment)[prefix_len:])
        return ids

    def _decode_run(self, run: list[int], at_start: bool) -> str:
        if at_start or self.anchor_id is None:
            return self.sp.decode(run)
        return self.sp.decode([self.anchor_id, *run])[len(self.anchor_text):]

    def decode(self, ids: Sequence[int], skip_ids: frozenset[int]) -> str:
        """Runs of ordinary pieces go through SentencePiece (byte fallback, "\u2581" -> " ", one
        leading space stripped at the start of the text, as HF does); added tokens are their text."""
        parts: list[str] = []
        run: list[int] = []
        for tid in ids:
            if tid in skip_ids:
                continue
            if tid in self.added:
                if run:
                    parts.append(self._decode_run(run, at_start=not parts))
                    run = []
                parts.append(self.added[tid])
            elif 0 <= tid < self.num_pieces:
                run.append(tid)
        if run:
            parts.append(self._decode_run(run, at_start=not parts))
        return "".join(parts)


class Tokenizer:
    """One model's tokenizer. Built by `load_tokenizer`; immutable afterwards."""

    def __init__(
        self,
        backend: _HFBackend | _SPMBackend,
        *,
        special_tokens: dict[str, str | None],
        template_tokens: dict[str, str],
        config_ids: dict[str, int | None],
        add_bos_token: bool,
        add_eos_token: bool,
        use_post_processor: bool,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self._template_tokens = template_tokens
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._use_post_processor = use_post_processor

        declared_ids: set[int] = set()

        def resolve(name: str) -> int | None:
            text = special_tokens.get(name)
            if text is not None:
                tid = backend.token_to_id(text)
                if tid is not None:
                    declared_ids.add(tid)
                    return tid
                logger.warning("%s %r is not in the vocabulary; falling back to config ids", name, text)
            return config_ids.get(name)

        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = (
            resolve(name) for name in _SPECIAL_NAMES)
        self.bos_token = self._token_text(special_tokens.get("bos_token"), self.bos_token_id)
        self.eos_token = self._token_text(special_tokens.get("eos_token"), self.eos_token_id)
        self.pad_token = self._token_text(special_tokens.get("pad_token"), self.pad_token_id)
        # HF's all_special_ids: declared special tokens and added tokens flagged special (an id taken
        # from config.json alone does not make an ordinary token special).
        self.all_special_ids: frozenset[int] = frozenset(declared_ids | set(backend.special_ids))
        if add_bos_token and self.bos_token_id is None:
            logger.warning("add_bos_token is set but the tokenizer has no BOS token; not adding one")
            self.add_bos_token = False
        if add_eos_token and self.eos_token_id is None:
            self.add_eos_token = False

    def _token_text(self, text: str | None, token_id: int | None) -> str | None:
        if text is not None:
            return text
        return self._backend.id_to_token(token_id) if token_id is not None else None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce, added tokens included (HF's `len(tokenizer)`)."""
        return self._backend.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, BOS/EOS are added as HF does: by the
        tokenizer.json post-processor, or per add_bos_token / add_eos_token when the config sets them
        (or there is no post-processor). Special-token strings inside `text` become their ids."""
        if add_special_tokens and self._use_post_processor:
            return self._backend.encode(text, with_post_processor=True)
        ids = self._backend.encode(text, with_post_processor=False)
        if add_special_tokens:
            if self.add_bos_token:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 byte runs decode to one U+FFFD per byte (as HF)."""
        skip = self.all_special_ids if skip_special_tokens else frozenset()
        return self._backend.decode(list(ids), skip)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation. Encode it with `add_special_tokens=False`: the
        template already writes the BOS text where the model expects it."""
        from frugal.model.chat_template import render_chat_template

        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._template_tokens,
            tools=tools,
        )

    def __repr__(self) -> str:
        kind = "tokenizers" if isinstance(self._backend, _HFBackend) else "sentencepiece"
        return (
            f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_id}, add_bos={self.add_bos_token})"
        )


def _chat_template_from(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    """HF's precedence: chat_template.jinja, then chat_template.json, then tokenizer_config.json. A
    list of named templates yields the one named 'default'."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template: Any = tok_config.get("chat_template")
    json_file = _read_json(model_dir / "chat_template.json")
    if json_file is not None and json_file.get("chat_template") is not None:
        template = json_file["chat_template"]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            logger.warning("chat templates %s have no 'default'; none used", sorted(map(str, named)))
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"chat_template in {model_dir} must be a string, got {type(template).__name__}")
    return template


def load_tokenizer(model_dir: Path | str) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json preferred over tokenizer.model).

    Reads the optional tokenizer_config.json, special_tokens_map.json (which wins, as in HF) and
    config.json (BOS/EOS/PAD id fallbacks). Raises ModelLoadError when neither tokenizer file exists
    or a file is garbled.
    """
    model_dir = Path(model_dir)
    json_path, spm_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    if not json_path.is_file() and not spm_path.is_file():
        raise ModelLoadError(
            f"no tokenizer in {model_dir}: looked for tokenizer.json and tokenizer.model"
        )
    tok_config = _read_json(model_dir / "tokenizer_config.json") or {}
    special_map = _read_json(model_dir / "special_tokens_map.json") or {}
    model_config = _read_json(model_dir / "config.json") or {}

    # Special-token strings: tokenizer_config.json, overridden by special_tokens_map.json.
    declared: dict[str, str | None] = {}
    for source in (tok_config, special_map):
        for name in _SPECIAL_NAMES:
            if name in source:
                declared[name] = _token_content(source[name])

    added_tokens: dict[int, str] = {}
    extra_special: set[int] = set()
    not_special: set[int] = set()
    decoder_entries = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder_entries, dict):
        raise ModelLoadError(f"added_tokens_decoder in {model_dir} must be an object")
    for key, entry in decoder_entries.items():
        content = _token_content(entry)
        if not str(key).isdigit() or content is None:
            raise ModelLoadError(f"bad added_tokens_decoder entry {key!r}: {entry!r} in {model_dir}")
        added_tokens[int(key)] = content
        if isinstance(entry, dict) and entry.get("special"):
            extra_special.add(int(key))
        elif isinstance(entry, dict) and entry.get("special") is False:
            not_special.add(int(key))

    if json_path.is_file():
        backend: _HFBackend | _SPMBackend = _HFBackend(json_path)
        explicit = "add_bos_token" in tok_config or "add_eos_token" in tok_config
        # As transformers: config flags replace the post-processor when given or when there is none.
        use_post_processor = backend.has_post_processor and not explicit
        add_bos = bool(tok_config.get("add_bos_token", False))
        add_eos = bool(tok_config.get("add_eos_token", False))
    else:
        legacy = tok_config.get("legacy")
        backend = _SPMBackend(spm_path, added_tokens, legacy=True if legacy is None else bool(legacy))
        use_post_processor = False
        add_bos = bool(tok_config.get("add_bos_token", True))  # HF LlamaTokenizer's default
        add_eos = bool(tok_config.get("add_eos_token", False))

    for source in (tok_config, special_map):
        for text in source.get("additional_special_tokens") or ():
            tid = backend.token_to_id(_token_content(text) or "")
            if tid is not None:
                extra_special.add(tid)
    # tokenizer_config.json's special flags win over the tokenizer file's (as in HF).
    backend.special_ids = (backend.special_ids - not_special) | extra_special

    config_ids = {name: _first_id(model_config.get(f"{name}_id")) for name in _SPECIAL_NAMES}
    if isinstance(backend, _SPMBackend):
        sp = backend.sp
        for name, sp_id in zip(_SPECIAL_NAMES, (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())):
            if config_ids[name] is None and sp_id >= 0:
                config_ids[name] = sp_id
            # Without a config entry, the model's own pieces are BOS/EOS/UNK (HF LlamaTokenizer's
            # defaults "<s>", "</s>", "<unk>"); there is no default PAD.
            if name not in declared and name != "pad_token" and sp_id >= 0:
                declared[name] = sp.id_to_piece(sp_id)

    # The template sees the declared token strings only (an explicit null stays undefined, as in HF).
    template_tokens = {name: text for name, text in declared.items() if text is not None}
    tokenizer = Tokenizer(
        backend,
        special_tokens=declared,
        template_tokens=template_tokens,
        config_ids=config_ids,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        use_post_processor=use_post_processor,
        chat_template=_chat_template_from(model_dir, tok_config),
    )
    logger.debug("loaded %r from %s", tokenizer, model_dir)
    return tokenizer
