"""Incremental detokenisation and stop-string detection for one sequence.

Decoding uses the prefix/read offset technique (vLLM, after HF's TextStreamer): keep the ids of the
text already emitted (`_ids[_prefix_offset:_read_offset]`, a short window) plus the ids not yet
turned into text; decode the window with and without the new ids and emit the difference. Decoding a
window rather than a single token keeps SentencePiece's leading-space rule and multi-token byte
fallback right; the window restarts after every emission, so the work per step is O(new tokens).

Always true:
- No emitted text ends inside a UTF-8 character: while the decoded window ends in U+FFFD the new ids
  stay unread (a lone invalid byte is flushed by the next readable token or by `finish()`).
- Emitted text is never retracted. With stop strings, the longest tail of the text that could still
  grow into a stop string is held back until it either completes one (the text is cut right before
  it, or after it with include_stop_str_in_output) or stops matching.
- Without a stop match, the concatenation of all deltas, `finish()` included, equals
  `decode(window + output ids)` minus `decode(window)`, where the window is the prompt's last few
  tokens; for a prompt of only special tokens (e.g. [BOS]) that is `tokenizer.decode(output ids)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from frugal.model.tokenizer import Tokenizer
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Prompt tokens kept as decoding context for the first output tokens (vLLM uses 5).
INITIAL_WINDOW_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text deltas; detects stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # Hold back only when a cut could be needed: an included stop string never removes text.
        self._hold_back = bool(self._stops) and not self._include_stop
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

        self._ids: list[int] = list(prompt_token_ids[-INITIAL_WINDOW_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # A prompt ending inside a UTF-8 character: treat its trailing bytes as unread so the
        # completed character is emitted once the output finishes it.
        while self._read_offset > 0 and self._decode(0, self._read_offset).endswith(_REPLACEMENT_CHAR):
            self._read_offset -= 1

        self._text = ""            # decoded (finalised) output text, emitted or held back
        self._num_emitted = 0      # characters of _text already returned
        self.stop_matched: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._num_emitted]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Consume new output ids; return the text they finalise ('' once stopped or finished)."""
        if self.finished:
            return ""
        self._ids.extend(new_token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._text += new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._drop_consumed_ids()
        return self._advance(final=False)

    def finish(self) -> str:
        """Flush everything held back (the request ended for a reason other than a stop string)."""
        if self.finished:
            return ""
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._prefix_offset, self._read_offset)
            self._text += self._decode(self._prefix_offset)[len(prefix_text):]
            self._prefix_offset = self._read_offset = len(self._ids)
        delta = self._advance(final=True)
        self.finished = True
        return delta

    def _drop_consumed_ids(self) -> None:
        """Forget ids before the window so memory stays O(window)."""
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _advance(self, final: bool) -> str:
        """Check stop strings in the unemitted text, then emit what is safe."""
        if self._stops:
            match = self._find_stop()
            if match is not None:
                index, stop = match
                end = index + len(stop) if self._include_stop else index
                self._text = self._text[:end]
                self.stop_matched = stop
                self.finished = True
                return self._emit(len(self._text))
        if final or not self._hold_back:
            return self._emit(len(self._text))
        return self._emit(len(self._text) - self._partial_stop_len())

    def _emit(self, end: int) -> str:
        delta = self._text[self._num_emitted:end] if end > self._num_emitted else ""
        self._num_emitted = max(self._num_emitted, end)
        return delta

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string starting in the unemitted text (first listed wins a tie).

        A stop string cannot start in emitted text: that text was never a prefix of one."""
        start = self._num_emitted
        if self._include_stop:  # nothing is held back, so a match may start in emitted text
            start = max(0, self._num_emitted - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_stop_len(self) -> int:
        """Length of the longest unemitted tail of the text that is a proper prefix of a stop string."""
        text = self._text
        longest = min(self._max_stop_len - 1, len(text) - self._num_emitted)
        for length in range(longest, 0, -1):
            tail = text[len(text) - length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
