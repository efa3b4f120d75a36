"""``chunkattn serve``: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn).

Endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/version``,
``/metrics``, ``/tokenize``, ``/detokenize``, ``/tokenizer_info``, ``/reset_prefix_cache``. Streams are
server-sent events (``data: {json}\\n\\n`` frames, then ``data: [DONE]\\n\\n``). Errors use OpenAI's
``{"error": {...}}`` body: 400 for bad input (validation included), 401, 404, 413, 503 once the engine
failed. A client that disconnects has its request aborted in the engine at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from chunkattn.engine.engine import EngineDeadError
from chunkattn.engine.llm import LLM
from chunkattn.engine.request import CompletionOutput, ErrorCode, RequestOutput, TokenLogprob
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
    error_body,
)
from chunkattn.server.tools import ToolPlan, new_call_id, template_message

DONE = "data: [DONE]\n\n"


@dataclass
class ServerConfig:
    """``model_name``: the id clients send as ``model`` (others get 404); ``api_key``: Bearer token needed on
    every route but /health, /version and /metrics (None: open); ``metrics_api_key``: Bearer token /metrics
    needs (None: /metrics is open); ``max_body_bytes``: larger bodies get 413."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    metrics_api_key: str | None = None


class APIError(Exception):
    """An error returned to the client as OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: ErrorType = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    @classmethod
    def of(cls, exc: Exception) -> APIError:
        """A 400 for a rejected input (``param`` from :class:`~chunkattn.errors.InvalidParamError`)."""
        return cls(400, str(exc), param=getattr(exc, "param", None))

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.status, self.param), status_code=self.status)

    def frame(self) -> str:
        return f"data: {json.dumps(error_body(self.message, self.type, self.status, self.param))}\n\n"


def _frame(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class _Job:
    """The engine requests of one HTTP request (one per prompt, each with ``n`` completions)."""

    def __init__(self, streams: list[OutputStream], prompt_texts: list[str]):
        self.streams = streams
        self.prompt_texts = prompt_texts
        self.ended: APIError | None = None  # set when the server ended the job (shutdown): the client gets it

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt index, output)`` as the engine produces them, all prompts merged."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

        async def pump(i: int, stream: OutputStream) -> None:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def finals(self) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(self.streams)
        async for i, out in self.outputs():
            if out.finished:
                finals[i] = out
        return [f for f in finals if f is not None]


class Server:
    """The HTTP layer over an engine: an :class:`LLM` in this process or any :class:`EngineClient` (e.g. the
    replicas of a cluster); :meth:`app` builds the ASGI application."""

    def __init__(self, engine: LLM | EngineClient, config: ServerConfig):
        self.engine: EngineClient = LocalEngine(engine) if isinstance(engine, LLM) else engine
        self.config = config
        self.metrics = ServerMetrics(config.model_name)
        self.created = int(time.time())
        self.tokenizer = self.engine.tokenizer
        self._token_text: Callable[[int], str] = lru_cache(maxsize=1 << 16)(self._decode_one)
        from chunkattn.system import info

        self.system = info()  # the machine and kernel paths, for /version
        self.jobs: set[_Job] = set()  # the jobs whose responses are not complete (on the event loop's thread)
        self.draining = False  # set by :meth:`drain`: new requests get 503, /health says "draining"
        self.end_now = False  # set (any thread) to end a drain's wait early
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving the app, once it started

    # ------------------------------------------------------------------ helpers
    def _decode_one(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return str(self.tokenizer.decode([token_id]))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves "
                                f"`{self.config.model_name}`).", "not_found_error", "model")

    def _check_healthy(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", "service_unavailable")
        if self.engine.error is not None:
            raise APIError(503, f"the engine failed and serves no more requests: {self.engine.error}",
                           "service_unavailable")

    def _tokenize(self, prompt: str | list[int]) -> tuple[str, list[int]]:
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

    def _chat_ids(self, body: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool = True,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
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

    def _max_tokens(self, requested: int | None, num_prompt: int, n: int, param: str, prompt_param: str) -> int:
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

    async def _prepare(self, params: SamplingParams) -> None:
        try:
            await self.engine.prepare(params)
        except (ValueError, TypeError) as exc:
            raise APIError.of(exc) from None

    def _submit(self, prompts: Sequence[tuple[str, list[int]]], params: SamplingParams, salt: str | None,
                request_id: str) -> _Job:
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
        job = _Job(streams, [t for t, _ in prompts])
        self.jobs.add(job)
        return job

    def _close(self, job: _Job) -> None:
        """The job's response is complete (or its client gone): abort what still runs, stop tracking it."""
        job.abort()
        self.jobs.discard(job)

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

    def _finished(self, out: RequestOutput) -> None:
        if out.finished and out.error is None and all(c.finish_reason != "abort" for c in out.outputs):
            self.metrics.observe(out.metrics)

    @staticmethod
    def _error_of(out: RequestOutput) -> APIError | None:
        if out.error is None:
            return None
        if out.error_code is ErrorCode.INVALID_REQUEST:
            return APIError(400, out.error)
        return APIError(500, f"the engine failed: {out.error}", "server_error")

    # ------------------------------------------------------------------ logprobs formats
    def _completion_logprobs(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                             offset: int) -> dict[str, Any]:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for tid, e in zip(token_ids, entries):
            text = self._token_text(tid)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if e is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(e.logprob)
            top = {self._token_text(t): lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries: Sequence[TokenLogprob], num_top: int) -> dict[str, Any]:
        def item(tid: int, lp: float) -> dict[str, Any]:
            text = self._token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:num_top]]}
                            for e in entries]}

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if len(body.prompts()) * body.n > MAX_CHOICES:
            raise APIError(400, f"n: {len(body.prompts())} prompts x n={body.n} asks for more than {MAX_CHOICES} "
                                f"completions in one request", param="n")
        prompts = [self._tokenize(p) for p in body.prompts()]
        max_tokens = min(self._max_tokens(body.max_tokens, len(ids), body.n, "max_tokens", "prompt")
                         for _, ids in prompts)
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        try:
            params = body.sampling(max_tokens, body.logprobs, prompt_logprobs)
        except (ValueError, TypeError) as exc:
            raise APIError.of(exc) from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        await self._prepare(params)
        job = self._submit(prompts, params, body.cache_salt, rid)
        if body.stream:
            return EventStream(self._completion_frames(body, job, rid), lambda: self._close(job))
        return await self._respond(request, job, lambda finals: self._completion_body(body, job, finals, rid))

    async def _respond(self, request: Request, job: _Job,
                       make_body: Callable[[list[RequestOutput]], dict[str, Any]]) -> Response:
        """A non-streamed job's JSON response once every request finished (499 if the client left first:
        the job is aborted either way)."""
        try:
            finals = await until_disconnect(request, job.finals())
        finally:
            self._close(job)
        if finals is None:
            return Response(status_code=499)
        if job.ended is not None:
            raise job.ended
        for out in finals:
            err = self._error_of(out)
            if err is not None:
                raise err
            self._finished(out)
        return JSONResponse(make_body(finals))

    @staticmethod
    def _with_prompt(out: RequestOutput, entries: Sequence[TokenLogprob | None], ids: Sequence[int]
                     ) -> tuple[list[TokenLogprob | None], list[int]]:
        """Logprob entries and token ids preceded by the prompt's (echo; the first prompt token has none)."""
        prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return [*prompt_entries, *entries], [*out.prompt_token_ids, *ids]

    def _completion_body(self, body: CompletionRequest, job: _Job, finals: list[RequestOutput],
                         rid: str) -> dict[str, Any]:
        choices = []
        prompt_tokens = completion_tokens = cached = 0
        for p, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.metrics.num_cached_tokens
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = (job.prompt_texts[p] if body.echo else "") + c.text
                logprobs = None
                if body.logprobs is not None:
                    entries: list[TokenLogprob | None] = list(c.logprobs or [])
                    ids = list(c.token_ids)
                    if body.echo:
                        entries, ids = self._with_prompt(out, entries, ids)
                    logprobs = self._completion_logprobs(entries, ids, 0)
                choices.append({"index": p * body.n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.config.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens, cached)}

    def _completion_frames(self, body: CompletionRequest, job: _Job, rid: str) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}  # per choice: characters of logprob tokens sent so far (text_offset)

        def choice(p: int, out: RequestOutput, c: CompletionOutput, first: bool) -> dict[str, Any]:
            index = p * body.n + c.index
            text = c.delta_text
            logprobs = None
            if body.logprobs is not None:
                entries: list[TokenLogprob | None] = list(c.delta_logprobs or [])
                ids = list(c.delta_token_ids)
                if first and body.echo:
                    entries, ids = self._with_prompt(out, entries, ids)
                logprobs = self._completion_logprobs(entries, ids, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
            if first and body.echo:
                text = job.prompt_texts[p] + text
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}

        return self._frames(body, job, {"id": rid, "object": "text_completion"}, body.n, choice)

    async def _frames(self, body: CompletionRequest | ChatCompletionRequest, job: _Job, base: dict[str, Any], n: int,
                      choice: Callable[[int, RequestOutput, CompletionOutput, bool], dict[str, Any]]
                      ) -> AsyncIterator[str]:
        """The server-sent events of a streamed job: a chunk per completion that has something new (its first
        token always), an error frame if the engine fails, the usage chunk if asked for, ``[DONE]``. Leaving
        early (a disconnect) aborts the job."""
        base = {**base, "created": int(time.time()), "model": self.config.model_name}
        usage = _UsageTracker(len(job.streams))
        started: set[int] = set()
        done: set[int] = set()
        try:
            async for p, out in job.outputs():
                err = job.ended or self._error_of(out)
                if err is not None:
                    yield err.frame()
                    yield DONE
                    return
                usage.update(p, out)
                for c in out.outputs:
                    index = p * n + c.index
                    if index in done or not (c.delta_token_ids or c.delta_text or c.finished):
                        continue  # (a finished completion is reported once, whatever its siblings do)
                    chunk: dict[str, Any] = {**base, "choices": [choice(p, out, c, index not in started)]}
                    started.add(index)
                    if c.finished:
                        done.add(index)
                    if body.include_usage:
                        chunk["usage"] = usage.body() if body.continuous_usage else None
                    yield _frame(chunk)
                if out.finished:
                    self._finished(out)
            if job.ended is not None:
                yield job.ended.frame()
                yield DONE
                return
            if body.include_usage:
                yield _frame({**base, "choices": [], "usage": usage.body()})
            yield DONE
        finally:
            self._close(job)

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            plan = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls,
                               getattr(self.tokenizer, "chat_template", None))
        except ValueError as exc:
            raise APIError.of(exc) from None
        ids = self._chat_ids(body, body.add_generation_prompt, plan.template_tools())
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(requested, len(ids), body.n, param, "messages")
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
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        await self._prepare(params)
        job = self._submit([("", ids)], params, body.cache_salt, rid)
        if body.stream:
            return EventStream(self._chat_frames(body, job, rid, plan), lambda: self._close(job))
        return await self._respond(request, job, lambda finals: self._chat_body(body, finals[0], rid, plan))

    @staticmethod
    def _tool_message(plan: ToolPlan, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """``(message, finish_reason)`` of a finished completion under a tool plan."""
        calls, content = plan.calls(c.text) if plan.active else ([], c.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        return message, reason

    def _chat_body(self, body: ChatCompletionRequest, out: RequestOutput, rid: str, plan: ToolPlan
                   ) -> dict[str, Any]:
        choices = []
        for c in out.outputs:
            logprobs = self._chat_logprobs(c.logprobs or [], body.top_logprobs or 0) if body.logprobs else None
            message, reason = self._tool_message(plan, c)
            choices.append({"index": c.index, "message": message,
                            "logprobs": logprobs, "finish_reason": reason, "stop_reason": c.stop_reason})
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": self.config.model_name, "choices": choices,
                "usage": _usage(len(out.prompt_token_ids), completion_tokens, out.metrics.num_cached_tokens)}

    def _chat_frames(self, body: ChatCompletionRequest, job: _Job, rid: str, plan: ToolPlan) -> AsyncIterator[str]:
        call_ids: dict[int, str] = {}  # (named function) completion index -> its call's id

        def choice(p: int, out: RequestOutput, c: CompletionOutput, first: bool) -> dict[str, Any]:
            logprobs = self._chat_logprobs(c.delta_logprobs or [], body.top_logprobs or 0) if body.logprobs else None
            reason = c.finish_reason
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if plan.mode == "named":  # the output is the arguments: stream them
                assert plan.name is not None
                call: dict[str, Any] = {"index": 0, "function": {"arguments": c.delta_text}}
                if c.index not in call_ids:
                    call_ids[c.index] = new_call_id()
                    call.update(id=call_ids[c.index], type="function")
                    call["function"]["name"] = plan.name
                delta.update(content=None, tool_calls=[call])
                reason = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
            elif plan.buffered:  # calls are parsed from the whole output
                if c.finished:
                    message, reason = self._tool_message(plan, c)
                    delta["content"] = message["content"]
                    if "tool_calls" in message:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            else:
                delta["content"] = c.delta_text
            return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

        return self._frames(body, job, {"id": rid, "object": "chat.completion.chunk"}, body.n, choice)

    # ------------------------------------------------------------------ the rest
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "chunkattn", "root": self.config.model_name,
                                            "max_model_len": self.engine.max_model_len}]}

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages")
        if body.messages is not None:
            ids = self._chat_ids(body)
        else:
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer")
            try:
                ids = [int(t) for t in self.tokenizer(body.prompt,
                                                      add_special_tokens=body.add_special_tokens)["input_ids"]]
            except (TypeError, ValueError, UnicodeError) as exc:
                raise APIError(400, f"prompt: the tokenizer rejected it: {exc}", param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        vocab = self.engine.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer", "not_found_error")

        def text(name: str) -> str | None:
            value = getattr(tok, name, None)
            return None if value is None else str(value)

        return {"tokenizer_class": type(tok).__name__, "model_max_length": self.engine.max_model_len,
                "vocab_size": len(tok), "chat_template": getattr(tok, "chat_template", None),
                "eos_token": text("eos_token"), "eos_token_id": getattr(tok, "eos_token_id", None),
                "bos_token": text("bos_token"), "bos_token_id": getattr(tok, "bos_token_id", None),
                "pad_token": text("pad_token"), "pad_token_id": getattr(tok, "pad_token_id", None),
                "unk_token": text("unk_token"), "add_bos_token": getattr(tok, "add_bos_token", None)}

    async def render_metrics(self) -> bytes:
        return self.metrics.render(await self.engine.snapshot(self.metrics.snapshot))

    async def reset_prefix_cache(self) -> dict[str, Any]:
        return {"freed_chunks": await self.engine.reset_prefix_cache()}

    # ------------------------------------------------------------------ the ASGI app
    def app(self) -> Any:
        from chunkattn import __version__

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            self.loop = asyncio.get_running_loop()
            yield

        api = FastAPI(title="chunkattn", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                      lifespan=lifespan)

        @api.exception_handler(APIError)
        async def _api_error(_: Request, exc: APIError) -> JSONResponse:
            return exc.response()

        @api.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return _validation_error(request, exc).response()

        @api.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            type_: ErrorType = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            message = str(exc.detail)
            if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
                message = f"{message}: {request.method} {request.url.path} (see GET /v1/models, POST " \
                          f"/v1/completions, POST /v1/chat/completions)"
            return APIError(exc.status_code, message, type_).response()

        @api.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

        @api.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await self.completions(body, request)

        @api.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
            return await self.chat_completions(body, request)

        @api.get("/v1/models")
        async def models() -> dict[str, Any]:
            return self.models()

        @api.get("/health")
        async def health() -> Response:
            if self.draining:
                return APIError(503, "draining: the server is shutting down", "service_unavailable").response()
            problem = await self.engine.health()
            if problem is None:
                return Response(status_code=200)
            return APIError(503, f"unhealthy: {problem}", "service_unavailable").response()

        @api.get("/version")
        async def version() -> dict[str, Any]:
            return {"version": __version__, "system": self.system}

        @api.get("/metrics")
        async def metrics() -> Response:
            return PlainTextResponse(await self.render_metrics(), media_type="text/plain; version=0.0.4")

        @api.post("/tokenize")
        async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
            return self.tokenize(body)

        @api.post("/detokenize")
        async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
            return self.detokenize(body)

        @api.get("/tokenizer_info")
        async def tokenizer_info() -> dict[str, Any]:
            return self.tokenizer_info()

        @api.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> dict[str, Any]:
            return await self.reset_prefix_cache()

        app: Any = BodyLimitMiddleware(api, self.config.max_body_bytes)
        if self.config.api_key or self.config.metrics_api_key:
            keys = {"/metrics": self.config.metrics_api_key} if self.config.metrics_api_key else None
            app = APIKeyMiddleware(app, self.config.api_key, path_keys=keys)
        return app


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


class _UsageTracker:
    """Token counts of a streamed job so far."""

    def __init__(self, num_prompts: int):
        self.prompt = [0] * num_prompts
        self.cached = [0] * num_prompts
        self.completion: list[dict[int, int]] = [{} for _ in range(num_prompts)]

    def update(self, p: int, out: RequestOutput) -> None:
        self.prompt[p] = len(out.prompt_token_ids)
        self.cached[p] = out.metrics.num_cached_tokens
        for c in out.outputs:
            self.completion[p][c.index] = len(c.token_ids)

    def body(self) -> dict[str, Any]:
        return _usage(sum(self.prompt), sum(sum(d.values()) for d in self.completion), sum(self.cached))


def build_app(engine: LLM | EngineClient, config: ServerConfig) -> Any:
    """The ASGI application serving ``engine`` (run it with uvicorn)."""
    return Server(engine, config).app()


__all__ = ["APIError", "Server", "ServerConfig", "build_app"]
