"""The OpenAI-compatible HTTP server (``chunkattn serve``): FastAPI routes over one engine, served by uvicorn.

Needs the ``server`` extra's packages (FastAPI, uvicorn, prometheus-client), installed by default.
"""

from chunkattn.server.app import APIError, Server, ServerConfig, build_app
from chunkattn.server.run import run_server

__all__ = ["APIError", "Server", "ServerConfig", "build_app", "run_server"]
