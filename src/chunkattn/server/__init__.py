"""The OpenAI-compatible HTTP server (``chunkattn serve``): FastAPI routes over one engine, served by uvicorn.

Its packages (FastAPI, uvicorn, prometheus-client, llguidance for structured outputs) are core dependencies:
``pip install chunkattn`` installs them. See docs/serving.md.
"""

from chunkattn.server.app import APIError, Server, ServerConfig, build_app
from chunkattn.server.run import run_server

__all__ = ["APIError", "Server", "ServerConfig", "build_app", "run_server"]
