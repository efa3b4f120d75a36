"""``EngineLoop``: the one driver of an :class:`~chunkattn.engine.engine.LLMEngine`.

A thread that calls ``step()`` while the engine has work and hands every output to the sink its request
was submitted with. ``LLM.generate``, ``LLM.stream``, ``AsyncLLM`` and the serving benchmark all submit
through it; nothing else steps the engine. The thread starts when work arrives and ends when the engine is
idle, so an unused engine holds no thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from chunkattn.engine.engine import LLMEngine, Prompt
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams

Sink = Callable[[RequestOutput], None]
T = TypeVar("T")


class EngineLoop:
    """Steps ``engine`` on a background thread; outputs go to each request's sink (called on that thread)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._sinks: dict[str, Sink] = {}
        self._thread: threading.Thread | None = None
        self.sink_errors = 0  # sinks that raised (their exceptions are dropped so the loop goes on)

    def submit(self, prompt: Prompt, params: SamplingParams | None, sink: Sink, request_id: str | None = None,
               arrival_time: float | None = None) -> str:
        """Queue one request whose outputs go to ``sink``; returns its id (raises on bad input)."""
        return self.submit_many([(prompt, params, request_id)], sink, arrival_time)[0]

    def submit_many(self, requests: Sequence[tuple[Prompt, SamplingParams | None, str | None]], sink: Sink,
                    arrival_time: float | None = None) -> list[str]:
        """Queue several requests at once (they reach the same step); all outputs go to ``sink``."""
        engine = self.engine
        made = [engine.make_request(p, sp, rid, arrival_time) for p, sp, rid in requests]
        ids = [r.request_id for r in made]
        with self._lock:
            for rid in ids:
                self._sinks[rid] = sink
        try:
            engine.enqueue(made)
        except BaseException:
            with self._lock:
                for rid in ids:
                    self._sinks.pop(rid, None)
            raise
        self._ensure_running()
        return ids

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its sink receives the final output."""
        self.engine.abort(request_id)
        self._ensure_running()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine's thread before its next step (safe access to the cache)."""
        future = self.engine.call_soon(fn)
        self._ensure_running()
        return future

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chunkattn-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                if not engine.has_work():
                    self._thread = None
                    return
            for out in engine.step():
                with self._lock:
                    sink = self._sinks.pop(out.request_id, None) if out.finished else \
                        self._sinks.get(out.request_id)
                if sink is not None:
                    try:
                        sink(out)
                    except Exception:  # noqa: BLE001 - a consumer's bug must not stop other requests
                        self.sink_errors += 1

    @property
    def is_running(self) -> bool:
        return self._thread is not None
