"""Pure ASGI pieces of the server: API-key check, request-body limit, a server-sent-events response that
notices a client leaving, and :func:`until_disconnect` for plain responses.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so that a client's ``http.disconnect`` reaches the
endpoint: that is how an abandoned request is aborted in the engine within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chunkattn.server.protocol import error_body

T = TypeVar("T")
log = logging.getLogger("chunkattn.server")


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class APIKeyMiddleware:
    """Every HTTP route except ``open_paths`` needs ``Authorization: Bearer <api_key>`` (the scheme in any
    case, as RFC 7235 has it; the key compared in constant time); otherwise 401 in OpenAI's error format.
    ``path_keys`` gives some paths a key of their own (e.g. ``/metrics``: ``--metrics-api-key``)."""

    def __init__(self, app: ASGIApp, api_key: str | None,
                 open_paths: Iterable[str] = ("/health", "/version", "/metrics"),
                 path_keys: dict[str, str] | None = None):
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.path_keys = {path: key.encode() for path, key in (path_keys or {}).items()}
        self.open_paths = frozenset(open_paths) - set(self.path_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        expected = self.path_keys.get(scope["path"], self.expected)
        if expected is None:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
                break
        if not hmac.compare_digest(given, expected):
            await send_json(send, 401, error_body("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                                  "authentication_error", 401),
                            [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether announced by ``content-length`` or
    streamed chunked. The body is read here and replayed to the app; later ``receive`` calls go to the
    server, so disconnects stay visible."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        await send_json(send, 413, error_body(f"the request body exceeds the server's limit of {self.max_bytes} "
                                              f"bytes (--max-body-bytes)", "invalid_request_error", 413))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        await self._too_large(send)
                        return
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first: then cancel it (its cleanup aborts the engine
    request) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        # (a cancelled task is only done once its cancellation ran: wait for both, which raises nothing)
        await asyncio.wait({task, watcher})
    if task.cancelled():
        return None
    return task.result()


class EventStream(Response):
    """``text/event-stream`` of ``frames`` (each already formatted as ``data: ...\\n\\n``). Stops and closes
    ``frames`` (whose cleanup aborts the engine request) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        self.frames = frames
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumper = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pumper, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumper, watcher):
                if not task.done():
                    task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, OSError):
                    pass  # cancelled, or the client is gone
                except Exception:  # noqa: BLE001 - a broken stream must still be cleaned up below
                    log.exception("streaming a response failed")
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                self.on_close()
