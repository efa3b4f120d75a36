"""Start a server: uvicorn's event loop on a thread of its own, the engine driven on the calling thread.

Why this way round: the engine's CPU kernels run on OpenMP, and once a second thread has used OpenMP, GNU
OpenMP throttles every team's spin-waiting (see :mod:`chunkattn.engine.loop`). The model was loaded on the
calling thread, so stepping it there too keeps OpenMP on one thread; the HTTP thread only parses, tokenizes
and formats. (Stepping on a fresh background thread made decode steps ~25% slower here.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from chunkattn.engine.llm import LLM
from chunkattn.server.app import Server, ServerConfig

log = logging.getLogger("chunkattn.server")


def run_server(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", **uvicorn_options: Any) -> None:
    """Serve ``llm`` on ``host:port`` (loopback by default: pass ``host="0.0.0.0"`` to expose it, and set an
    API key when you do). Blocks until interrupted (Ctrl-C or SIGTERM) or the HTTP server stops."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    server = Server(llm, config)
    app = server.app()
    system = server.system
    model, cache = llm.engine.model, llm.engine.cache
    log.info("chunkattn %s: model %s (%d layers, %s, K/V pool %d tokens) on %s, %d torch threads; auth %s; "
             "listening on http://%s:%d", system["chunkattn"], config.model_name, model.config.num_layers,
             str(cache.dtype).removeprefix("torch."), cache.num_slots * cache.chunk_size, system["cpu"]["model"],
             system["torch_threads"], "on (API key)" if config.api_key else "off", host, port)
    for part, path in system["paths"].items():
        log.info("kernel path, %s: %s", part, path)
    http = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
        access_log=os.environ.get("CHUNKATTN_ACCESS_LOG", "0") == "1", **uvicorn_options))
    thread = threading.Thread(target=http.run, name="chunkattn-http", daemon=True)
    stop = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main else None
    thread.start()
    try:
        llm.loop.drive(lambda: stop.is_set() or not thread.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        thread.join(timeout=15)
        if on_main:
            signal.signal(signal.SIGTERM, previous)
