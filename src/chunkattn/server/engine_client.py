"""What the HTTP layer needs of an engine: :class:`EngineClient`.

The server (:class:`chunkattn.server.app.Server`) talks only to this interface, so one server serves a local
engine (:class:`LocalEngine`, the engine in this process) or many replicas behind a router
(:class:`chunkattn.cluster.serve.ClusterEngine`, on Ray Serve) with the same routes, streaming, errors, auth
and metrics.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Protocol

from chunkattn.engine.engine import max_tokens_limit
from chunkattn.engine.llm import LLM, AsyncLLM
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.server.metrics import EngineSnapshot, engine_snapshot


class OutputStream(Protocol):
    """The outputs of one submitted request (the last has ``finished`` set); :meth:`abort` ends it early and
    is a no-op once it finished (e.g. :class:`~chunkattn.engine.llm.RequestStream`)."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def abort(self) -> None: ...


class EngineClient(ABC):
    """An engine (or a set of replicas) as the server sees it.

    Attributes: ``tokenizer`` (None: token ids only), ``vocab_size``, ``max_model_len`` (context in tokens),
    ``chunk_size`` and ``num_chunks`` (one engine's K/V cache: the limit a request must fit in).
    """

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    chunk_size: int
    num_chunks: int

    @property
    def cache_tokens(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    @abstractmethod
    def error(self) -> str | None:
        """Why the engine serves no more requests (None: it does)."""

    async def prepare(self, params: SamplingParams) -> None:  # noqa: B027 - a no-op unless overridden
        """Work a request needs before it is submitted that must not run on the event loop (compiling a new
        structured-output spec: up to a second or two). Raises ``InvalidParamError`` for an invalid spec."""

    async def health(self) -> str | None:
        """What ``/health`` reports: None when requests can be served, else why not."""
        return None if self.error is None else f"the engine failed: {self.error}"

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt's text (no special tokens added). Raises ``ValueError`` if it cannot."""

    def max_tokens_limit(self, num_prompt_tokens: int, n: int = 1) -> int:
        """The largest ``max_tokens`` a prompt may ask for (< 1: the prompt alone does not fit)."""
        return max_tokens_limit(self.max_model_len, self.num_chunks, self.chunk_size, num_prompt_tokens, n)

    @abstractmethod
    def submit(self, token_ids: list[int], params: SamplingParams, request_id: str,
               cache_salt: str | None) -> OutputStream:
        """Queue a request (on the running event loop). Raises ``ValueError``/``TypeError`` on bad input and
        :class:`~chunkattn.engine.engine.EngineDeadError` when the engine takes no more requests."""

    @abstractmethod
    async def snapshot(self, previous: EngineSnapshot) -> EngineSnapshot | None:
        """Engine-wide numbers for /metrics (None: not available now)."""

    @abstractmethod
    async def reset_prefix_cache(self) -> int:
        """Drop every retained prefix; returns the chunks freed."""


async def compile_off_loop(engine: Any, params: SamplingParams) -> None:
    """Compile ``params``' structured-output spec in a worker thread unless it is cached (the engine's
    ``make_request`` then only copies the compiled matcher, on whatever thread submits)."""
    spec = params.structured
    if spec is not None and not engine.grammars.is_compiled(spec):
        await asyncio.to_thread(engine.grammars.matcher, spec)


class LocalEngine(EngineClient):
    """The engine of an :class:`LLM` in this process."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.engine = llm.engine
        self._async = AsyncLLM(llm)
        self.tokenizer = llm.tokenizer
        self.vocab_size = int(self.engine.model.config.vocab_size)
        self.max_model_len = self.engine.max_model_len
        self.chunk_size = self.engine.cache.chunk_size
        self.num_chunks = self.engine.cache.num_slots

    @property
    def error(self) -> str | None:
        return None if self.engine.is_healthy else str(self.engine.error)

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenize(text)[1])

    def submit(self, token_ids: list[int], params: SamplingParams, request_id: str,
               cache_salt: str | None) -> OutputStream:
        return self._async.submit(token_ids, params, request_id, cache_salt=cache_salt)

    async def prepare(self, params: SamplingParams) -> None:
        await compile_off_loop(self.engine, params)

    async def snapshot(self, previous: EngineSnapshot) -> EngineSnapshot | None:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.llm.loop.call(
                lambda: engine_snapshot(self.engine, previous))), timeout=10)
        except (TimeoutError, asyncio.TimeoutError):
            return None  # a long step: serve the previous snapshot rather than hang the scraper

    async def reset_prefix_cache(self) -> int:
        return await asyncio.wrap_future(self.llm.loop.call(self.engine.cache.evict_all))


__all__ = ["EngineClient", "LocalEngine", "OutputStream"]
