"""Start a server: load the model, build the engine and the app, run uvicorn until interrupted."""

from __future__ import annotations

import logging
import os
from typing import Any

from chunkattn.engine.llm import LLM
from chunkattn.server.app import Server, ServerConfig

log = logging.getLogger("chunkattn.server")


def run_server(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", **uvicorn_options: Any) -> None:
    """Serve ``llm`` on ``host:port`` (loopback by default: pass ``host="0.0.0.0"`` to expose it, and set an
    API key when you do). Blocks until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    app = Server(llm, config).app()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                access_log=os.environ.get("CHUNKATTN_ACCESS_LOG", "0") == "1", **uvicorn_options)
