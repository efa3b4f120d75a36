"""``EngineLoop``: the one driver of an :class:`~chunkattn.engine.engine.LLMEngine`.

All stepping goes through :meth:`EngineLoop._step`, which hands every output to the sink its request was
submitted with. ``LLM.generate``, ``LLM.stream``, ``AsyncLLM`` and the serving benchmark all submit through
it; nothing else steps the engine. Exactly one thread drives at a time:

* a caller that waits for its own requests (``LLM.generate``, ``LLM.stream``) drives on its own thread
  (:meth:`drive`), unless a background driver is already running, in which case it waits for it;
* otherwise a background thread drives while the engine has work and ends when it is idle, so an unused
  engine holds no thread.

Why not always a background thread: PyTorch's CPU kernels run on OpenMP, and once two threads have used
OpenMP, GNU OpenMP throttles the spin-waiting of every team (more threads than cores), which made a decode
step ~20% slower on the dev machine. Driving on the caller's thread keeps to one team in the common case.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from chunkattn.engine.engine import LLMEngine, Prompt
from chunkattn.engine.request import Request, RequestOutput
from chunkattn.engine.sampling import SamplingParams

Sink = Callable[[RequestOutput], None]
T = TypeVar("T")


class EngineLoop:
    """Drives ``engine``; outputs go to each request's sink (called on the driving thread)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._stepped = threading.Condition(self._lock)  # notified after every step
        self._sinks: dict[str, Sink] = {}
        self._thread: threading.Thread | None = None  # the background driver, if running
        self._caller: threading.Thread | None = None  # a caller driving on its own thread, if any
        self.sink_errors = 0  # sinks that raised (their exceptions are dropped so the loop goes on)

    # ------------------------------------------------------------------ any thread
    def submit(self, prompt: Prompt, params: SamplingParams | None, sink: Sink, request_id: str | None = None,
               arrival_time: float | None = None, start: bool = True, cache_salt: str | None = None) -> str:
        """Queue one request whose outputs go to ``sink``; returns its id (raises on bad input)."""
        request = self.engine.make_request(prompt, params, request_id, arrival_time, cache_salt)
        return self._submit([request], sink, start)[0]

    def submit_many(self, requests: Sequence[tuple[Prompt, SamplingParams | None, str | None]], sink: Sink,
                    arrival_time: float | None = None, start: bool = True) -> list[str]:
        """Queue several requests at once (they reach the same step); all outputs go to ``sink``.
        ``start=False`` leaves driving to the caller (see :meth:`drive`)."""
        made = [self.engine.make_request(p, sp, rid, arrival_time) for p, sp, rid in requests]
        return self._submit(made, sink, start)

    def _submit(self, made: list[Request], sink: Sink, start: bool) -> list[str]:
        engine = self.engine
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
        if start:
            self._ensure_driver()
        return ids

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its sink receives the final output."""
        self.engine.abort(request_id)
        self._ensure_driver()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the driving thread before the next step (safe access to the cache)."""
        future = self.engine.call_soon(fn)
        self._ensure_driver()
        return future

    def drive(self, until: Callable[[], bool]) -> None:
        """Step on the calling thread until ``until()`` holds; while a background driver runs, wait for it
        instead. Work left when ``until()`` holds (other callers' requests) goes to a background driver."""
        me = threading.current_thread()
        while not until():
            with self._lock:
                if self._thread is not None or self._caller not in (None, me):
                    self._stepped.wait(0.05)
                    continue
                self._caller = me
            try:
                while not until():
                    if self.engine.has_work():
                        self._step()
                    else:  # our requests are in flight elsewhere (another thread's submit): look again soon
                        self.engine.wait_for_work(0.01)
            finally:
                with self._lock:
                    self._caller = None
        self._ensure_driver()

    @property
    def is_running(self) -> bool:
        return self._thread is not None or self._caller is not None

    # ------------------------------------------------------------------ driving
    def _ensure_driver(self) -> None:
        with self._lock:
            if self._thread is None and self._caller is None and self.engine.has_work():
                self._thread = threading.Thread(target=self._run, name="chunkattn-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self.engine.has_work():
                    self._thread = None
                    self._stepped.notify_all()
                    return
            self._step()

    def _step(self) -> None:
        outputs = self.engine.step()
        for out in outputs:
            with self._lock:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                try:
                    sink(out)
                except Exception:  # noqa: BLE001 - a consumer's bug must not stop other requests
                    self.sink_errors += 1
        with self._lock:
            self._stepped.notify_all()
