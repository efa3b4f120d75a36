"""``chunkattn serve``: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn).

Endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/version``,
``/metrics``, ``/tokenize``, ``/detokenize``, ``/tokenizer_info``, ``/reset_prefix_cache``. Streams are
server-sent events (``data: {json}\\n\\n`` frames, then ``data: [DONE]\\n\\n``). Errors use OpenAI's
``{"error": {...}}`` body: 400 for bad input (validation included), 401, 404, 413, 503 once the engine
failed. A client that disconnects has its request aborted in the engine at the next step.

Here: :class:`Server` (tokenizes and checks a request, submits it to the engine and tracks it until its
response ends; graceful shutdown; metrics) and the routes, each one function on :data:`router` that finds its
:class:`Server` in ``request.app.state``. Elsewhere: the OpenAI bodies and frames made of the engine's outputs,
and :class:`APIError`, in :mod:`chunkattn.server.serving`; request bodies and their validation in
:mod:`chunkattn.server.protocol`; auth, the body limit and streaming in :mod:`chunkattn.server.asgi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from chunkattn import __version__
from chunkattn.engine.engine import EngineDeadError
from chunkattn.engine.llm import LLM
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.server.asgi import APIKeyMiddleware, BodyLimitMiddleware, EventStream, until_disconnect
from chunkattn.server.engine_client import EngineClient, LocalEngine, OutputStream
from chunkattn.server.metrics import ServerMetrics
from chunkattn.server.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorType,
    TokenizeRequest,
)
from chunkattn.server.serving import APIError, Job, Shaper, error_of
from chunkattn.server.tools import ToolPlan, template_message


@dataclass
class ServerConfig:
    """``model_name``: the id clients send as ``model`` (others get 404); ``api_key``: Bearer token needed on
    every route but /health, /version and /metrics (None: open); ``metrics_api_key``: Bearer token /metrics
    needs (None: /metrics is open); ``max_body_bytes``: larger bodies get 413."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    metrics_api_key: str | None = None


class Server:
    """The HTTP layer over an engine: an :class:`LLM` in this process or any :class:`EngineClient` (e.g. the
    replicas of a cluster); :meth:`app` builds the ASGI application."""

    def __init__(self, engine: LLM | EngineClient, config: ServerConfig):
        self.engine: EngineClient = LocalEngine(engine) if isinstance(engine, LLM) else engine
        self.config = config
        self.metrics = ServerMetrics(config.model_name)
        self.created = int(time.time())
        self.tokenizer = self.engine.tokenizer
        self.shaper = Shaper(config.model_name, self.tokenizer, self._record_finished, self.close)
        from chunkattn.system import info

        self.system = info()  # the machine and kernel paths, for /version
        self.jobs: set[Job] = set()  # the jobs whose responses are not complete (on the event loop's thread)
        self.draining = False  # set by :meth:`drain`: new requests get 503, /health says "draining"
        self.end_now = False  # set (any thread) to end a drain's wait early
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving the app, once it started

    # ------------------------------------------------------------------ checking a request
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves "
                                f"`{self.config.model_name}`).", "not_found_error", "model")

    def _check_healthy(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", "service_unavailable")
        if self.engine.error is not None:
            raise APIError(503, f"the engine failed and serves no more requests: {self.engine.error}",
                           "service_unavailable")

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        """``(text, token ids)`` of a completion prompt given as text or as token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt: the prompt is empty", param="prompt")
            if self.tokenizer is None:
                raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
            try:
                ids = self.engine.tokenize(prompt)
            except (TypeError, ValueError, UnicodeError) as exc:
                raise APIError(400, f"prompt: the tokenizer rejected it: {exc}", param="prompt") from None
            return prompt, ids
        vocab = self.engine.vocab_size
        bad = next((t for t in prompt if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        return (self.tokenizer.decode(prompt) if self.tokenizer is not None else ""), list(prompt)

    def chat_ids(self, body: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool = True,
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The token ids of ``body.messages`` through the chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
        renders_tools = "tools" in self.tokenizer.chat_template
        try:
            messages = [template_message(m.as_template_input(), renders_tools) for m in body.messages or []]
            extra = {"tools": tools} if tools else {}
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, **extra)
        except APIError:
            raise
        except ValueError as exc:  # (ours: unsupported content parts)
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is the client's input
            raise APIError(400, f"messages: the chat template rejected them: {exc}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def max_tokens(self, requested: int | None, num_prompt: int, n: int, param: str, prompt_param: str) -> int:
        """``requested`` (the body's field ``param``) checked against the context and the cache, or the most
        that fits when None; ``prompt_param`` names the prompt's field in errors."""
        context = self.engine.max_model_len
        limit = self.engine.max_tokens_limit(num_prompt, n)
        if num_prompt >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{num_prompt} tokens.", param=prompt_param)
        if requested is None:
            if limit < 1:
                raise APIError(400, f"the prompt ({num_prompt} tokens, n={n}) leaves no room in the K/V cache "
                                    f"({self.engine.cache_tokens} tokens)")
            return limit
        if num_prompt + requested > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the "
                                f"completion). Reduce the prompt or {param}.", param=param)
        if requested > limit:
            raise APIError(400, f"{param}={requested} with a {num_prompt}-token prompt and n={n} needs more K/V "
                                f"than the cache holds ({self.engine.cache_tokens} tokens): at most "
                                f"{max(limit, 0)} fit.",
                           param=param)
        return requested

    async def prepare(self, params: SamplingParams) -> None:
        try:
            await self.engine.prepare(params)
        except (ValueError, TypeError) as exc:
            raise APIError.of(exc) from None

    # ------------------------------------------------------------------ a request's life
    def submit(self, prompts: Sequence[tuple[str, list[int]]], params: SamplingParams, salt: str | None,
               request_id: str) -> Job:
        """One engine request per ``(text, token ids)`` prompt, tracked as a job until :meth:`close`."""
        self._check_healthy()
        streams: list[OutputStream] = []
        try:
            for i, (_, ids) in enumerate(prompts):
                streams.append(self.engine.submit(ids, params, f"{request_id}-{i}", salt))
        except EngineDeadError as exc:
            for s in streams:
                s.abort()
            raise APIError(503, str(exc), "service_unavailable") from None
        except (ValueError, TypeError) as exc:
            for s in streams:
                s.abort()
            raise APIError.of(exc) from None
        job = Job(streams, [t for t, _ in prompts])
        self.jobs.add(job)
        return job

    def close(self, job: Job) -> None:
        """The job's response is complete (or its client gone): abort what still runs, stop tracking it."""
        job.abort()
        self.jobs.discard(job)

    async def respond(self, request: Request, job: Job,
                      make_body: Callable[[list[RequestOutput]], dict[str, Any]]) -> Response:
        """A non-streamed job's JSON response once every request finished (499 if the client left first:
        the job is aborted either way)."""
        try:
            finals = await until_disconnect(request, job.finals())
        finally:
            self.close(job)
        if finals is None:
            return Response(status_code=499)
        if job.ended is not None:
            raise job.ended
        for out in finals:
            err = error_of(out)
            if err is not None:
                raise err
            self._record_finished(out)
        return JSONResponse(make_body(finals))

    def _record_finished(self, out: RequestOutput) -> None:
        if out.finished and out.error is None and all(c.finish_reason != "abort" for c in out.outputs):
            self.metrics.observe(out.metrics)

    async def drain(self, timeout: float) -> int:
        """Graceful shutdown, on the serving event loop: take no new requests (503; /health 503 "draining"),
        wait up to ``timeout`` seconds (or until :attr:`end_now`) for the requests in flight to finish, then end
        the rest: a stream gets an error frame and ``[DONE]``, a plain request a 503. Returns how many were
        ended that way."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.jobs and loop.time() < deadline and not self.end_now:
            await asyncio.sleep(0.05)
        left = list(self.jobs)
        error = APIError(503, f"the server shut down before this request finished (it waited {timeout:g} s for "
                              f"the requests in flight)", "service_unavailable")
        for job in left:
            job.ended = error
            job.abort()
        deadline = loop.time() + 10.0  # their responses end as soon as the engine has aborted them
        while self.jobs and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return len(left)

    # ------------------------------------------------------------------ the ASGI app
    def app(self) -> Any:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            self.loop = asyncio.get_running_loop()
            yield

        api = FastAPI(title="chunkattn", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                      lifespan=lifespan, exception_handlers={
                          APIError: _api_error, RequestValidationError: _invalid,
                          StarletteHTTPException: _http_error, Exception: _unexpected})
        api.state.server = self  # (where the routes find it)
        api.include_router(router)
        app: Any = BodyLimitMiddleware(api, self.config.max_body_bytes)
        if self.config.api_key or self.config.metrics_api_key:
            keys = {"/metrics": self.config.metrics_api_key} if self.config.metrics_api_key else None
            app = APIKeyMiddleware(app, self.config.api_key, path_keys=keys)
        return app


# ---------------------------------------------------------------------------------------------- the routes
router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    server = _server(request)
    server.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if len(body.prompts()) * body.n > MAX_CHOICES:
        raise APIError(400, f"n: {len(body.prompts())} prompts x n={body.n} asks for more than {MAX_CHOICES} "
                            f"completions in one request", param="n")
    prompts = [server.tokenize_prompt(p) for p in body.prompts()]
    max_tokens = min(server.max_tokens(body.max_tokens, len(ids), body.n, "max_tokens", "prompt")
                     for _, ids in prompts)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    try:
        params = body.sampling(max_tokens, body.logprobs, prompt_logprobs)
    except (ValueError, TypeError) as exc:
        raise APIError.of(exc) from None
    rid = f"cmpl-{uuid.uuid4().hex}"
    await server.prepare(params)
    job = server.submit(prompts, params, body.cache_salt, rid)
    if body.stream:
        return EventStream(server.shaper.completion_frames(body, job, rid), lambda: server.close(job))
    return await server.respond(request, job, lambda finals: server.shaper.completion_body(body, job, finals, rid))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    server = _server(request)
    server.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    try:
        plan = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls,
                           getattr(server.tokenizer, "chat_template", None))
    except ValueError as exc:
        raise APIError.of(exc) from None
    ids = server.chat_ids(body, body.add_generation_prompt, plan.template_tools())
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = _chat_sampling(body, plan, server.max_tokens(requested, len(ids), body.n, param, "messages"))
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    await server.prepare(params)
    job = server.submit([("", ids)], params, body.cache_salt, rid)
    if body.stream:
        return EventStream(server.shaper.chat_frames(body, job, rid, plan), lambda: server.close(job))
    return await server.respond(request, job, lambda finals: server.shaper.chat_body(body, finals[0], rid, plan))


def _chat_sampling(body: ChatCompletionRequest, plan: ToolPlan, max_tokens: int) -> SamplingParams:
    """The chat request's sampling parameters, its output constrained to the tool calls where the plan says."""
    try:
        params = body.sampling(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        tool_structure = plan.structured()
        if tool_structure is not None:
            if params.structured is not None:
                raise APIError(400, "tool_choice 'required' or a named function constrains the output "
                                    "itself: drop response_format / structured_outputs", param="tool_choice")
            params = params.replace(structured=tool_structure)
    except (ValueError, TypeError) as exc:
        raise APIError.of(exc) from None
    return params


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    server = _server(request)
    name = server.config.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                        "owned_by": "chunkattn", "root": name,
                                        "max_model_len": server.engine.max_model_len}]}


@router.get("/health")
async def health(request: Request) -> Response:
    server = _server(request)
    if server.draining:
        return APIError(503, "draining: the server is shutting down", "service_unavailable").response()
    problem = await server.engine.health()
    if problem is None:
        return Response(status_code=200)
    return APIError(503, f"unhealthy: {problem}", "service_unavailable").response()


@router.get("/version")
async def version(request: Request) -> dict[str, Any]:
    return {"version": __version__, "system": _server(request).system}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    server = _server(request)
    text = server.metrics.render(await server.engine.snapshot(server.metrics.snapshot))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    server = _server(request)
    server.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages")
    if body.messages is not None:
        ids = server.chat_ids(body)
    else:
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            ids = [int(t) for t in server.tokenizer(body.prompt,
                                                    add_special_tokens=body.add_special_tokens)["input_ids"]]
        except (TypeError, ValueError, UnicodeError) as exc:
            raise APIError(400, f"prompt: the tokenizer rejected it: {exc}", param="prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    server = _server(request)
    server.check_model(body.model)
    if server.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    vocab = server.engine.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": server.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    server = _server(request)
    tok = server.tokenizer
    if tok is None:
        raise APIError(404, "this model has no tokenizer", "not_found_error")

    def text(name: str) -> str | None:
        value = getattr(tok, name, None)
        return None if value is None else str(value)

    return {"tokenizer_class": type(tok).__name__, "model_max_length": server.engine.max_model_len,
            "vocab_size": len(tok), "chat_template": getattr(tok, "chat_template", None),
            "eos_token": text("eos_token"), "eos_token_id": getattr(tok, "eos_token_id", None),
            "bos_token": text("bos_token"), "bos_token_id": getattr(tok, "bos_token_id", None),
            "pad_token": text("pad_token"), "pad_token_id": getattr(tok, "pad_token_id", None),
            "unk_token": text("unk_token"), "add_bos_token": getattr(tok, "add_bos_token", None)}


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> dict[str, Any]:
    return {"freed_chunks": await _server(request).engine.reset_prefix_cache()}


# ---------------------------------------------------------------------------------------------- errors
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_error(request, exc).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_: ErrorType = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = str(exc.detail)
    if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = f"{message}: {request.method} {request.url.path} (see GET /v1/models, POST " \
                  f"/v1/completions, POST /v1/chat/completions)"
    return APIError(exc.status_code, message, type_).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def _validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """pydantic's first complaint about a body as an :class:`APIError` naming the field (its ``param``)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    content_type = request.headers.get("content-type", "")
    if kind == "json_invalid":  # (its loc is a character offset: not a field)
        at = first.get("loc", ("body", None))[-1]
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
                             f" (at character {at})", param=None)
    if not loc and kind in ("model_attributes_type", "dict_type", "missing", "model_type"):
        if "json" not in content_type.lower():
            return APIError(400, f"the body must be a JSON object sent with 'Content-Type: application/json' (got "
                                 f"{content_type or 'no content type'!r})")
        return APIError(400, "the body must be a JSON object (got "
                             f"{json.dumps(first.get('input'), default=str)[:60]})")
    where = ".".join(loc) or "body"
    param = loc[0] if loc else None
    if kind == "invalid":  # our own validators' messages say what is wrong and show the value
        return APIError(400, f"{where}: {first.get('msg')}", param=param)
    message = f"{where}: {first.get('msg', 'invalid')}"
    if "input" in first and kind != "missing":
        message += f" (got {json.dumps(first['input'], default=str)[:100]})"
    return APIError(400, message, param=param)


def build_app(engine: LLM | EngineClient, config: ServerConfig) -> Any:
    """The ASGI application serving ``engine`` (run it with uvicorn)."""
    return Server(engine, config).app()


__all__ = ["APIError", "Server", "ServerConfig", "build_app"]
