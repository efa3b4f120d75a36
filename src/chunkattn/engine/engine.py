"""``LLMEngine``: continuous batching of requests over the prefix cache, one ``step()`` at a time.

Threads: ``add_request``, ``abort`` and ``call_soon`` may be called from any thread; they validate what they
can at once (so that a bad request raises to its caller) and put the rest in an inbox that ``step()`` drains
at its start. ``step()`` itself is called by one driver only (:class:`~chunkattn.engine.loop.EngineLoop`), so
the scheduler, the cache and the requests are touched by that thread alone and a caller never waits a whole
step for a lock. An exception inside a step fails every request in the engine with that error, marks the
engine unhealthy (:attr:`LLMEngine.error`) and refuses new requests: no caller is left waiting.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from chunkattn.attention.backend import backend_names
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.engine.detokenizer import IncrementalDetokenizer, StopStrings
from chunkattn.engine.host import keep_freed_memory
from chunkattn.engine.model_runner import ModelRunner, RunnerOutput, new_seed
from chunkattn.engine.request import Completion, Request, RequestOutput, RequestState, describe
from chunkattn.engine.sampling import SamplingParams
from chunkattn.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from chunkattn.engine.structured import GrammarCompiler
from chunkattn.errors import ChunkAttnError, InvalidParamError
from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.utils import cdiv

Prompt = str | Sequence[int]
T = TypeVar("T")


class EngineError(ChunkAttnError, RuntimeError):
    """The engine cannot go on."""


def check_cache_salt(cache_salt: Any) -> None:
    """Raise ``ValueError`` unless ``cache_salt`` is None or a non-empty string."""
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError("cache_salt must be a non-empty string")


def encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    """A prompt's token ids as the engine computes them (no special tokens added: chat templates and callers
    add their own). Raises ``ValueError`` without a tokenizer."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids")
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def max_tokens_limit(max_model_len: int, num_chunks: int, chunk_size: int, num_prompt_tokens: int,
                     n: int = 1) -> int:
    """The largest ``max_tokens`` for a prompt of ``num_prompt_tokens`` with ``n`` completions: within the
    context and a cache of ``num_chunks`` chunks (the prompt's chunks, then per completion its tokens and one
    chunk of slack). Below 1: the prompt alone does not fit."""
    by_cache = chunk_size * ((num_chunks - cdiv(num_prompt_tokens, chunk_size)) // max(n, 1) - 1)
    return min(max_model_len - num_prompt_tokens, by_cache)


class EngineDeadError(EngineError):
    """A step failed earlier; the engine refuses new work (see :attr:`LLMEngine.error`)."""


@dataclass
class EngineStats:
    """Counters since the engine started. ``phase_time``: seconds per step phase (schedule, model, process)."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    cached_prompt_tokens: int = 0  # of which found in the prefix cache
    computed_tokens: int = 0  # tokens run through the model (prefill + decode + recompute)
    output_tokens: int = 0
    decode_steps: int = 0  # steps that computed no prefill token
    decode_step_tokens: int = 0
    decode_step_time: float = 0.0
    preemptions: int = 0
    peak_live_kv_bytes: int = 0  # K/V bytes of chunks referenced by running sequences (retained ones excluded)
    busy_time: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> completions
    phase_time: dict[str, float] = field(default_factory=dict)

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_step_tokens / self.decode_step_time if self.decode_step_time else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(self.__dict__)
        d["prefix_hit_rate"] = self.prefix_hit_rate
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class EngineConfig:
    """``jump_forward``: append the tokens a structured output's grammar forces in one step (see
    :mod:`chunkattn.engine.structured`)."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backend: str = "auto"
    jump_forward: bool = True

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {self.backend!r}")


# What other threads put in the engine's inbox; the engine's thread applies them at the start of a step.
@dataclass(frozen=True, slots=True)
class _Add:
    request: Request


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


class LLMEngine:
    """Continuous batching over a :class:`PrefixKVCache` (see the module doc for the threading contract)."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Any, cache: PrefixKVCache,
                 config: EngineConfig | None = None):
        mc = model.config
        if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (mc.num_layers, mc.num_kv_heads, mc.head_dim):
            raise ValueError("the cache's layers / kv heads / head_dim do not match the model's")
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config or EngineConfig()
        if cache.device.type == "cpu":
            keep_freed_memory()
        self.scheduler = Scheduler(cache, self.config.scheduler)
        self.eos_token_ids = tuple(mc.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, int(mc.vocab_size), self.eos_token_ids)
        self.runner = ModelRunner(model, cache, self.config.backend, self.eos_token_ids, self.grammars)
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._detok_tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None  # loop thread's own
        self._encode_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inbox: deque[_Add | _Abort | _Call] = deque()
        self._ids_in_use: set[str] = set()  # ids of requests in the inbox or the engine (guarded by _cond)
        self._requests: dict[str, Request] = {}  # loop thread only
        self._counter = itertools.count()

    # ------------------------------------------------------------------ any thread
    @property
    def is_healthy(self) -> bool:
        return self.error is None

    def tokenize(self, prompt: Prompt) -> tuple[str | None, tuple[int, ...]]:
        """``(text or None, token ids)`` of a prompt given as text or token ids (validated)."""
        if isinstance(prompt, str):
            with self._encode_lock:
                return prompt, encode(self.tokenizer, prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        try:
            ids = tuple(t.__index__() for t in prompt if not isinstance(t, bool))
        except (AttributeError, TypeError):
            raise ValueError("a prompt is text or a list of int token ids") from None
        if len(ids) != len(prompt):
            raise ValueError("a prompt is text or a list of int token ids")
        return None, ids

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     arrival_time: float | None = None, cache_salt: str | None = None) -> Request:
        """A validated request (not queued). Raises ``ValueError`` on bad input, naming the limit.
        ``cache_salt``: the request shares cached K/V only with requests of the same salt (None: the common
        pool), so one tenant cannot learn another's prompts from cache-hit timing."""
        params = params or SamplingParams()
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams (or a dict of its fields), got "
                            f"{type(params).__name__}")
        text, ids = self.tokenize(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, tokens in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidParamError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", name)
        if params.stop and self.tokenizer is None:
            raise InvalidParamError("stop: stop strings need a tokenizer (this model has none)", "stop")
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context} tokens")
        c = self.cache.chunk_size
        worst = cdiv(len(ids), c) + params.n * (cdiv(params.max_tokens, c) + 1)
        if worst > self.cache.num_slots:
            raise ValueError(f"a prompt of {len(ids)} tokens with n={params.n}, max_tokens={params.max_tokens} "
                             f"needs up to {worst} chunks of {c} tokens; the cache has {self.cache.num_slots}: "
                             f"raise its size or lower max_tokens")
        if request_id is None:
            request_id = f"req-{next(self._counter)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        completions = []
        for i in range(params.n):
            seed = (params.seed + i) if params.seed is not None else new_seed()
            completions.append(Completion(i, seed, logprobs=[] if params.logprobs is not None else None))
        if params.structured is not None:
            for comp in completions:  # (compiled once per distinct spec; invalid specs raise here)
                comp.grammar = self.grammars.matcher(params.structured)
            self.grammars.stats.requests += 1
        check_cache_salt(cache_salt)
        request = Request(request_id, text, ids, params, completions, StopStrings(params.stop),
                          cache_salt=cache_salt)
        if params.prompt_logprobs is not None:  # one entry per prompt token, the first None (also for one token)
            request.prompt_logprobs = [None] * len(ids)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        return request

    @property
    def max_model_len(self) -> int:
        """The model's context in tokens (prompt + output)."""
        return int(self.model.config.max_position_embeddings)

    def max_tokens_limit(self, num_prompt_tokens: int, n: int = 1) -> int:
        """The largest ``max_tokens`` a prompt of ``num_prompt_tokens`` with ``n`` completions may ask for:
        within the model's context and what the K/V cache can hold (< 1: the prompt alone is too long)."""
        return max_tokens_limit(self.max_model_len, self.cache.num_slots, self.cache.chunk_size,
                                num_prompt_tokens, n)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises ``ValueError`` for bad input or
        an id already in use, :class:`EngineDeadError` once the engine failed."""
        return self.add_requests([(prompt, params, request_id)], arrival_time)[0]

    def add_requests(self, requests: Sequence[tuple[Prompt, SamplingParams | None, str | None]],
                     arrival_time: float | None = None) -> list[str]:
        """Queue several requests at once (all or none): they reach the same step."""
        return self.enqueue([self.make_request(p, sp, rid, arrival_time) for p, sp, rid in requests])

    def enqueue(self, requests: Sequence[Request]) -> list[str]:
        """Queue requests made by :meth:`make_request` (all or none)."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate request ids in one call")
        with self._cond:
            if self.error is not None:
                raise EngineDeadError(f"the engine failed and takes no new requests: {describe(self.error)}")
            taken = [i for i in ids if i in self._ids_in_use]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            self._ids_in_use.update(ids)
            self._inbox.extend(_Add(r) for r in requests)
            self._cond.notify_all()
        return ids

    def abort(self, request_id: str) -> None:
        """Finish a request now (``finish_reason="abort"``), whether waiting, running or preempted, and free
        its chunks. Idempotent: unknown or finished ids are ignored."""
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify_all()

    def call_soon(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine's thread at the start of the next step (to read or change the cache
        safely); the future holds its result."""
        future: Future[T] = Future()
        with self._cond:
            self._inbox.append(_Call(fn, future))
            self._cond.notify_all()
        return future

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (or ``timeout`` seconds pass)."""
        with self._cond:
            return self._cond.wait_for(self.has_work, timeout)

    @property
    def num_unfinished(self) -> int:
        with self._cond:
            return len(self._ids_in_use)

    # ------------------------------------------------------------------ the driver's thread
    def step(self) -> list[RequestOutput]:
        """Drain the inbox, schedule, run the model once, sample; return the outputs of requests that
        produced tokens, finished or failed this step."""
        outputs = self._drain_inbox()
        if self.error is not None or not self.scheduler.has_work:
            return outputs
        t0 = time.perf_counter()
        try:
            sched = self.scheduler.schedule()
            t1 = time.perf_counter()
            result = self.runner.execute(sched) if sched.units else RunnerOutput()
            t2 = time.perf_counter()
            outputs += self._process(sched, result, t2)
            t3 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - a failed step must reach every waiting caller
            return outputs + self._fail_all(exc)
        self._account(sched, t3 - t0, {"schedule": t1 - t0, "model": t2 - t1, "process": t3 - t2})
        return outputs

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        outputs: list[RequestOutput] = []
        for item in items:
            if isinstance(item, _Add):
                r = item.request
                if self.error is not None:
                    outputs.append(self._finish_with_error(r, self.error))
                    continue
                try:  # (the loop thread's tokenizer: made here, not by the callers' threads)
                    self._start_detokenizers(r)
                except Exception as exc:  # noqa: BLE001 - this request fails; the engine goes on
                    outputs.append(self._finish_with_error(r, f"the tokenizer failed on the prompt's end: "
                                                              f"{describe(exc)}"))
                    continue
                self._requests[r.request_id] = r
                self.scheduler.add(r)
            elif isinstance(item, _Abort):
                target = self._requests.get(item.request_id)
                if target is not None and not target.finished:
                    self.scheduler.abort(target)
                    for c in target.completions:
                        if not c.finished:
                            c.finish("abort")
                    outputs.append(self._retire(target, time.perf_counter()))
            elif item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    item.future.set_exception(exc)
        return outputs

    def _start_detokenizers(self, r: Request) -> None:
        if self._detok_tokenizer is not None:
            for c in r.completions:
                c.detokenizer = IncrementalDetokenizer(self._detok_tokenizer, r.prompt_ids,
                                                       r.params.skip_special_tokens)

    def _retire(self, r: Request, now: float) -> RequestOutput:
        """A finished request's last output; its id becomes free again."""
        r.state = RequestState.FINISHED
        r.finish_time = now
        for c in r.completions:
            self.stats.finished[c.finish_reason or "abort"] = self.stats.finished.get(c.finish_reason or "abort", 0) + 1
        self._requests.pop(r.request_id, None)
        with self._cond:
            self._ids_in_use.discard(r.request_id)
        return RequestOutput.of(r, report=True)

    def _finish_with_error(self, r: Request, error: BaseException | str) -> RequestOutput:
        r.error = describe(error)
        for c in r.completions:
            if not c.finished:
                c.finish("error")
        return self._retire(r, time.perf_counter())

    def _fail_all(self, exc: BaseException) -> list[RequestOutput]:
        """A step raised: fail every request (their K/V may be half written) and refuse new work."""
        with self._cond:
            self.error = exc
        outputs = []
        for r in list(self._requests.values()):
            try:
                self.scheduler.abort(r)
            except Exception:  # noqa: BLE001, S110 - the cache may be inconsistent; the requests fail anyway
                pass
            outputs.append(self._finish_with_error(r, exc))
        return outputs + self._drain_inbox()

    # ------------------------------------------------------------------ after the model ran
    def _process(self, sched: SchedulerOutput, result: RunnerOutput, now: float) -> list[RequestOutput]:
        changed: dict[str, Request] = {}
        for r, reason in sched.failed:
            r.error = reason
            for c in r.completions:
                if not c.finished:
                    c.finish("error")
            changed[r.request_id] = r
        for r, first, entries in result.prompt_logprobs:
            assert r.prompt_logprobs is not None  # (made with the request)
            r.prompt_logprobs[first : first + len(entries)] = entries
        for r, c, token, entry in result.samples:
            if r.first_token_time is None:
                r.first_token_time = now
            c.token_ids.append(token)
            c.token_times.append(now)
            if c.logprobs is not None and entry is not None:
                c.logprobs.append(entry)
            self.stats.output_tokens += 1
            self._check_stop(r, c, token)
            if c.grammar is not None and not c.finished:
                self._advance_grammar(r, c, token, now)
            changed[r.request_id] = r
        self.scheduler.update_from_output(changed.values())  # forks, releases, finished requests leave
        outputs = []
        for r in changed.values():
            if all(c.finished for c in r.completions):
                outputs.append(self._retire(r, now))
            else:
                outputs.append(RequestOutput.of(r, report=True))
        return outputs

    def _advance_grammar(self, r: Request, c: Completion, token: int, now: float) -> None:
        """Advance a structured completion's matcher by its sampled token; finish it once the structure is
        complete; append the tokens the grammar then forces (jump-forward: computed in the next step as one
        prefill). Not with logprobs: forced tokens have none."""
        m = c.grammar
        if not m.consume_token(token):
            r.error = f"structured outputs: the grammar rejected token {token} ({m.get_error()})"
            c.finish("error")
            return
        if m.is_stopped():
            c.finish("stop")
            return
        if not self.config.jump_forward or r.params.logprobs is not None:
            return
        for forced in m.compute_ff_tokens():
            if not m.consume_token(forced):
                r.error = f"structured outputs: a forced token was rejected ({m.get_error()})"
                c.finish("error")
                return
            c.token_ids.append(forced)
            c.token_times.append(now)
            self.stats.output_tokens += 1
            self.grammars.stats.forced_tokens += 1
            self._check_stop(r, c, forced)
            if c.finished:
                return
            if m.is_stopped():
                c.finish("stop")
                return

    def _check_stop(self, r: Request, c: Completion, token: int) -> None:
        p = r.params
        new_chars = 0
        if c.detokenizer is not None:
            piece = c.detokenizer.push(token)
            c.text += piece
            new_chars = len(piece)
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            c.finish("stop", token if token in p.stop_token_ids else None)
            return
        if len(c.token_ids) >= p.min_tokens and r.stop_strings.stops:
            at, stop, releasable = r.stop_strings.check(c.text, new_chars)
            if at is not None and stop is not None:
                c.text = c.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                c.finish("stop", stop)
                return
            c.num_released = releasable
        else:
            c.num_released = len(c.text)
        if len(c.token_ids) >= p.max_tokens or len(r.prompt_ids) + len(c.token_ids) >= \
                self.model.config.max_position_embeddings:
            c.finish("length")

    def _account(self, sched: SchedulerOutput, seconds: float, phases: dict[str, float]) -> None:
        s = self.stats
        s.steps += 1
        s.prompt_tokens = self.scheduler.admitted_prompt_tokens
        s.cached_prompt_tokens = self.scheduler.admitted_cached_tokens
        s.preemptions = self.scheduler.num_preemptions
        num_tokens = sched.batch.num_new_tokens if sched.batch is not None else 0
        s.computed_tokens += num_tokens
        s.busy_time += seconds
        for name, t in phases.items():
            s.phase_time[name] = s.phase_time.get(name, 0.0) + t
        if sched.units and all(len(u.tokens) == 1 and u.completion is not None for u in sched.units):
            s.decode_steps += 1
            s.decode_step_tokens += num_tokens
            s.decode_step_time += seconds
        live = self.cache.num_live_chunks * self.cache.chunk_bytes
        s.peak_live_kv_bytes = max(s.peak_live_kv_bytes, live)
