"""Start a server: uvicorn's event loop on a thread of its own, the engine driven on the calling thread.

Why this way round: the engine's CPU kernels run on OpenMP, and once a second thread has used OpenMP, GNU
OpenMP throttles every team's spin-waiting (see :mod:`chunkattn.engine.loop`). The model was loaded on the
calling thread, so stepping it there too keeps OpenMP on one thread; the HTTP thread only parses, tokenizes
and formats. (Stepping on a fresh background thread made decode steps ~25% slower here.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from chunkattn.engine.llm import LLM
from chunkattn.server.app import Server, ServerConfig

log = logging.getLogger("chunkattn.server")


def run_server(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", shutdown_timeout: float = 30.0, **uvicorn_options: Any) -> None:
    """Serve ``llm`` on ``host:port`` (loopback by default: pass ``host="0.0.0.0"`` to expose it, and set an
    API key when you do). Blocks until SIGTERM or Ctrl-C (or the HTTP server stops), then shuts down
    gracefully: new requests get 503 and ``/health`` says "draining", the requests in flight get up to
    ``shutdown_timeout`` seconds to finish, the rest end with an error (a stream: an error frame and
    ``[DONE]``); a second signal ends them at once."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    server = Server(llm, config)
    app = server.app()
    system = server.system
    model, cache = llm.engine.model, llm.engine.cache
    log.info("chunkattn %s: model %s (%d layers, %s, K/V pool %d tokens) on %s, %d torch threads; auth %s%s",
             system["chunkattn"], config.model_name, model.config.num_layers,
             str(cache.dtype).removeprefix("torch."), cache.num_slots * cache.chunk_size, system["cpu"]["model"],
             system["torch_threads"], "on (API key)" if config.api_key else "off",
             "; /metrics needs its own key" if config.metrics_api_key else "")
    for part, path in system["paths"].items():
        log.info("kernel path, %s: %s", part, path)
    http = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
        access_log=os.environ.get("CHUNKATTN_ACCESS_LOG", "0") == "1", **uvicorn_options))
    thread = threading.Thread(target=http.run, name="chunkattn-http", daemon=True)
    stop = threading.Event()

    signals = [0]

    def on_signal(signum: int, _: Any) -> None:
        signals[0] += 1
        if signals[0] >= 3:  # a third: stop at once, whatever is running
            raise KeyboardInterrupt
        if stop.is_set():
            server.end_now = True  # a second signal: end the requests in flight now
        server.draining = True  # at once (new requests 503); the drain itself starts after the current step
        stop.set()

    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
    watcher = _watch_signals(server) if on_main else None
    thread.start()
    try:
        llm.loop.drive(lambda: stop.is_set() or not thread.is_alive() or http.started)
        if not http.started and not stop.is_set():
            log.error("the HTTP server did not start (see uvicorn's message above: e.g. the port is in use)")
            raise SystemExit(1)
        if http.started:
            log.info("ready: serving on http://%s:%d", host, port)
        llm.loop.drive(lambda: stop.is_set() or not thread.is_alive())
        if thread.is_alive() and server.loop is not None:
            log.info("shutting down: %d request(s) in flight get up to %g s to finish (--shutdown-timeout); new "
                     "requests get 503", len(server.jobs), shutdown_timeout)
            drained = asyncio.run_coroutine_threadsafe(server.drain(shutdown_timeout), server.loop)
            llm.loop.drive(lambda: drained.done() or not thread.is_alive())
            if drained.done() and not drained.cancelled() and drained.exception() is None and drained.result():
                log.warning("ended %d request(s) still running after %g s with an error", drained.result(),
                            shutdown_timeout)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping without waiting for the requests in flight")
    finally:
        http.should_exit = True
        thread.join(timeout=15)
        if watcher is not None:
            watcher()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")


def _watch_signals(server: Server) -> Callable[[], None]:
    """Make SIGTERM / SIGINT turn new requests away at once (503, /health "draining") even while the main
    thread is inside a long native call (a whole step of the native layer loop: Python runs a signal handler only
    between bytecodes, so ``on_signal`` waits for the step to end). The C-level handler writes each signal's
    number to a wakeup socket (``signal.set_wakeup_fd``), which a thread reads. Returns the function that undoes
    it."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if any(n in (signal.SIGTERM, signal.SIGINT) for n in data):
                server.draining = True

    thread = threading.Thread(target=watch, name="chunkattn-signals", daemon=True)
    thread.start()

    def undo() -> None:
        signal.set_wakeup_fd(previous)
        reader.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
        thread.join(timeout=5)
        reader.close()
        writer.close()

    return undo
