"""OpenAI response shaping for the routes of :mod:`chunkattn.server.app`: the engine's
:class:`~chunkattn.engine.request.RequestOutput`\\ s as ``/v1/completions`` and ``/v1/chat/completions`` bodies and
server-sent events.

* :class:`APIError`: an error as OpenAI's ``{"error": {...}}`` body, in a JSON response or a stream's frame;
  :func:`error_of` is an engine output's error as one.
* :class:`Job`: the engine requests of one HTTP request (one per prompt), their outputs merged into one stream.
* :class:`Shaper`: a job's outputs as response bodies (:meth:`~Shaper.completion_body`,
  :meth:`~Shaper.chat_body`) or as ``data: {json}\\n\\n`` frames ending with ``data: [DONE]\\n\\n``
  (:meth:`~Shaper.completion_frames`, :meth:`~Shaper.chat_frames`): choices, logprobs in the completions' and
  the chat's formats, usage, tool calls (planned by :class:`~chunkattn.server.tools.ToolPlan`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import lru_cache
from typing import Any

from fastapi.responses import JSONResponse

from chunkattn.engine.request import CompletionOutput, ErrorCode, RequestOutput, TokenLogprob
from chunkattn.server.engine_client import OutputStream
from chunkattn.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorType, error_body
from chunkattn.server.tools import ToolPlan, new_call_id

DONE = "data: [DONE]\n\n"


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


def error_of(out: RequestOutput) -> APIError | None:
    """The engine's error on ``out`` as the client gets it (None: no error): 400 for an invalid request, else
    500."""
    if out.error is None:
        return None
    if out.error_code is ErrorCode.INVALID_REQUEST:
        return APIError(400, out.error)
    return APIError(500, f"the engine failed: {out.error}", "server_error")


def sse_frame(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Job:
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


class UsageTracker:
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
        return usage(sum(self.prompt), sum(sum(d.values()) for d in self.completion), sum(self.cached))


def with_prompt(out: RequestOutput, entries: Sequence[TokenLogprob | None], ids: Sequence[int]
                ) -> tuple[list[TokenLogprob | None], list[int]]:
    """Logprob entries and token ids preceded by the prompt's (echo; the first prompt token has none)."""
    prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return [*prompt_entries, *entries], [*out.prompt_token_ids, *ids]


def tool_message(plan: ToolPlan, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
    """``(message, finish_reason)`` of a finished completion under a tool plan."""
    calls, content = plan.calls(c.text) if plan.active else ([], c.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    return message, reason


class Shaper:
    """The OpenAI bodies and frames of one server's jobs. ``model_name`` is the ``model`` they name;
    ``tokenizer`` (None: token ids only) spells the logprobs' tokens. A stream calls ``on_finished`` with each
    output that finished (after its chunks), and ``on_close`` with its job when it ends, however it ends."""

    def __init__(self, model_name: str, tokenizer: Any, on_finished: Callable[[RequestOutput], None],
                 on_close: Callable[[Job], None]):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.on_finished = on_finished
        self.on_close = on_close
        self._token_text: Callable[[int], str] = lru_cache(maxsize=1 << 16)(self._decode_one)

    def _decode_one(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return str(self.tokenizer.decode([token_id]))

    # ------------------------------------------------------------------ logprobs formats
    def completion_logprobs(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int],
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

    def chat_logprobs(self, entries: Sequence[TokenLogprob], num_top: int) -> dict[str, Any]:
        def item(tid: int, lp: float) -> dict[str, Any]:
            text = self._token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:num_top]]}
                            for e in entries]}

    # ------------------------------------------------------------------ /v1/completions
    def completion_body(self, body: CompletionRequest, job: Job, finals: list[RequestOutput],
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
                        entries, ids = with_prompt(out, entries, ids)
                    logprobs = self.completion_logprobs(entries, ids, 0)
                choices.append({"index": p * body.n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)}

    def completion_frames(self, body: CompletionRequest, job: Job, rid: str) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}  # per choice: characters of logprob tokens sent so far (text_offset)

        def choice(p: int, out: RequestOutput, c: CompletionOutput, first: bool) -> dict[str, Any]:
            index = p * body.n + c.index
            text = c.delta_text
            logprobs = None
            if body.logprobs is not None:
                entries: list[TokenLogprob | None] = list(c.delta_logprobs or [])
                ids = list(c.delta_token_ids)
                if first and body.echo:
                    entries, ids = with_prompt(out, entries, ids)
                logprobs = self.completion_logprobs(entries, ids, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
            if first and body.echo:
                text = job.prompt_texts[p] + text
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}

        return self._frames(body, job, {"id": rid, "object": "text_completion"}, body.n, choice)

    # ------------------------------------------------------------------ /v1/chat/completions
    def chat_body(self, body: ChatCompletionRequest, out: RequestOutput, rid: str, plan: ToolPlan
                  ) -> dict[str, Any]:
        choices = []
        for c in out.outputs:
            logprobs = self.chat_logprobs(c.logprobs or [], body.top_logprobs or 0) if body.logprobs else None
            message, reason = tool_message(plan, c)
            choices.append({"index": c.index, "message": message,
                            "logprobs": logprobs, "finish_reason": reason, "stop_reason": c.stop_reason})
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": usage(len(out.prompt_token_ids), completion_tokens, out.metrics.num_cached_tokens)}

    def chat_frames(self, body: ChatCompletionRequest, job: Job, rid: str, plan: ToolPlan) -> AsyncIterator[str]:
        call_ids: dict[int, str] = {}  # (named function) completion index -> its call's id

        def choice(p: int, out: RequestOutput, c: CompletionOutput, first: bool) -> dict[str, Any]:
            logprobs = self.chat_logprobs(c.delta_logprobs or [], body.top_logprobs or 0) if body.logprobs else None
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
                    message, reason = tool_message(plan, c)
                    delta["content"] = message["content"]
                    if "tool_calls" in message:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            else:
                delta["content"] = c.delta_text
            return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

        return self._frames(body, job, {"id": rid, "object": "chat.completion.chunk"}, body.n, choice)

    # ------------------------------------------------------------------ either stream
    async def _frames(self, body: CompletionRequest | ChatCompletionRequest, job: Job, base: dict[str, Any], n: int,
                      choice: Callable[[int, RequestOutput, CompletionOutput, bool], dict[str, Any]]
                      ) -> AsyncIterator[str]:
        """The server-sent events of a streamed job: a chunk per completion that has something new (its first
        token always), an error frame if the engine fails, the usage chunk if asked for, ``[DONE]``. Leaving
        early (a disconnect) aborts the job."""
        base = {**base, "created": int(time.time()), "model": self.model_name}
        tracker = UsageTracker(len(job.streams))
        started: set[int] = set()
        done: set[int] = set()
        try:
            async for p, out in job.outputs():
                err = job.ended or error_of(out)
                if err is not None:
                    yield err.frame()
                    yield DONE
                    return
                tracker.update(p, out)
                for c in out.outputs:
                    index = p * n + c.index
                    if index in done or not (c.delta_token_ids or c.delta_text or c.finished):
                        continue  # (a finished completion is reported once, whatever its siblings do)
                    chunk: dict[str, Any] = {**base, "choices": [choice(p, out, c, index not in started)]}
                    started.add(index)
                    if c.finished:
                        done.add(index)
                    if body.include_usage:
                        chunk["usage"] = tracker.body() if body.continuous_usage else None
                    yield sse_frame(chunk)
                if out.finished:
                    self.on_finished(out)
            if job.ended is not None:
                yield job.ended.frame()
                yield DONE
                return
            if body.include_usage:
                yield sse_frame({**base, "choices": [], "usage": tracker.body()})
            yield DONE
        finally:
            self.on_close(job)


__all__ = ["DONE", "APIError", "Job", "Shaper", "UsageTracker", "error_of", "sse_frame", "tool_message", "usage",
           "with_prompt"]
