"""Incremental detokenization and stop strings: the text of a completion, one token at a time.

:class:`IncrementalDetokenizer` turns each new token into its new text without decoding the whole output
again, and holds back bytes of a multi-byte character split across tokens (never emitting U+FFFD for it).
:class:`StopStrings` finds stop strings in the growing text and tells how much of it can be released: a
suffix that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4  # prompt tokens decoded with the first output tokens (spacing of SentencePiece tokenizers)


class IncrementalDetokenizer:
    """The new text of each new token of one completion.

    Fast (Rust) tokenizers use ``tokenizers``' :class:`~tokenizers.decoders.DecodeStream`; others decode a
    window of the last few tokens (the prefix/read offsets of Hugging Face's ``TextStreamer``).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        # A prompt ending inside a character (byte-level tokens) would have its pending bytes, and the tokens
        # before them, emitted with the first output: start the context at the last complete character.
        for _ in range(4):
            if not context or not tokenizer.decode(context, skip_special_tokens=skip_special_tokens
                                                   ).endswith(REPLACEMENT):
                break
            context.pop()
        self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if getattr(tokenizer, "is_fast", False) and backend is not None:
            from tokenizers.decoders import DecodeStream

            try:
                self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers < 0.22: no prefill
                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._backend = backend
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def push(self, token_id: int) -> str:
        """Text that ``token_id`` completes ("" while a character is still incomplete)."""
        if self._stream is not None:
            return self._stream.step(self._backend, int(token_id)) or ""
        self._ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]


class StopStrings:
    """Stop-string matching over a completion's growing text.

    :meth:`check` returns the position where a stop string begins (None if none does) and the length of text
    safe to release: everything except a suffix that is a prefix of some stop string.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)

    def check(self, text: str, new_chars: int) -> tuple[int | None, str | None, int]:
        """``text``: the whole text so far, of which the last ``new_chars`` are new.

        Returns ``(stop_at, stop, releasable)``: the index where the earliest stop string found begins, that
        string, and how many leading characters can be released if no stop was found.
        """
        if not self.stops:
            return None, None, len(text)
        # a match must end inside the new characters, so it starts at most max_len - 1 before them
        start = max(0, len(text) - new_chars - self.max_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stops:
            at = text.find(s, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            return best[0], best[1], best[0]
        hold = 0
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.stops):
                hold = k
                break
        return None, None, len(text) - hold
