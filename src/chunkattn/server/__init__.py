"""The OpenAI-compatible HTTP server (``chunkattn serve``): FastAPI routes over one engine, served by uvicorn.

Its packages (FastAPI, uvicorn, pydantic, prometheus-client) are the ``server`` extra:
``pip install 'chunkattn[server]'``; without them importing this package raises
:class:`~chunkattn.extras.MissingExtraError` saying so. See docs/serving.md.
"""

from chunkattn.extras import require

require("server", "the HTTP server (chunkattn serve)")

from chunkattn.server.app import APIError, Server, ServerConfig, build_app  # noqa: E402 - after the check
from chunkattn.server.run import run_server  # noqa: E402

__all__ = ["APIError", "Server", "ServerConfig", "build_app", "run_server"]
