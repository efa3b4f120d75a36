"""Typed errors raised by chunkattn. User mistakes raise these; internal invariants use ``assert``."""

from __future__ import annotations


class ChunkAttnError(Exception):
    """Base class of every error chunkattn raises on purpose."""


class UnsupportedModelError(ChunkAttnError, ValueError):
    """The checkpoint is not a decoder chunkattn can run."""


class CacheFullError(ChunkAttnError, MemoryError):
    """The chunk pool cannot hold a request even after evicting every retained prefix.

    The cache is left exactly as it was before the call that raised.
    """


class InsufficientMemoryError(ChunkAttnError, MemoryError):
    """The model's weights or the K/V pool asked for would not fit the memory their device has available
    (checked before they are allocated, so that they fail at once, saying how much they need and what fits,
    instead of the allocator failing or the kernel's OOM killer ending the process later)."""


class SequenceError(ChunkAttnError, ValueError):
    """A sequence handle is unknown to this cache or was already released."""


class CacheCorruptedError(ChunkAttnError, AssertionError):
    """``PrefixKVCache.check()`` found a broken invariant (a bug in chunkattn, please report it)."""


class InvalidParamError(ChunkAttnError, ValueError):
    """A request's parameter is invalid; ``param`` names it (as the OpenAI API spells it), so that a server
    can report it in its error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
