"""Requests, their completions, and what the engine reports back (outputs with deltas, logprobs, timings)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from chunkattn.cache.cache import Sequence
from chunkattn.engine.detokenizer import IncrementalDetokenizer, StopStrings
from chunkattn.engine.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


class ErrorCode(str, enum.Enum):
    """Why a request failed (``RequestOutput.error_code``): what a server maps to a status, so that rewording
    a message cannot change it. ``INVALID_REQUEST``: the request cannot be served as asked (e.g. it needs
    more K/V than the cache holds; HTTP 400); ``ENGINE``: the engine failed (500)."""

    INVALID_REQUEST = "invalid_request"
    ENGINE = "engine"


class RequestState(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its sequences released; it will recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability (natural log, the model's distribution) and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(eq=False)
class Completion:
    """One of a request's ``n`` completions. ``seq`` holds prompt + output tokens computed so far.

    ``text`` is the detokenized output; ``num_released`` how much of it may be shown (a tail that could
    still become a stop string is held back). ``num_reported_*`` mark what the last output already sent.
    """

    index: int
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    num_released: int = 0
    finish_reason: str | None = None  # see FINISH_REASONS
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    seq: Sequence | None = None
    detokenizer: IncrementalDetokenizer | None = None
    num_reported_tokens: int = 0
    num_reported_chars: int = 0
    grammar: Any = None  # llguidance matcher of a structured completion (see chunkattn.engine.structured)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop: str | int | None = None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop
        self.num_released = len(self.text)


@dataclass(eq=False)
class Request:
    """A prompt and its completions, with timings for metrics.

    Before its first token a request has a single sequence (the prompt, shared by all completions); at the
    first token each completion gets its own (``fork``): ``forked`` is then True.
    """

    request_id: str
    prompt: str | None
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    completions: list[Completion]
    stop_strings: StopStrings
    arrival_time: float = field(default_factory=time.perf_counter)  # perf_counter seconds
    created: float = field(default_factory=time.time)  # wall clock (Unix seconds)
    state: RequestState = RequestState.WAITING
    forked: bool = False
    prompt_seq: Sequence | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    overtaken: int = 0  # later requests admitted while this one waited (the scheduler's starvation bound)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)
    error: str | None = None
    error_code: ErrorCode | None = None  # set with ``error`` (None there: ENGINE)
    cache_salt: str | None = None  # shares cached K/V only with requests of the same salt (tenant isolation)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def live_completions(self) -> list[Completion]:
        """Completions not finished: one sequence each once forked (before, they will fork the prompt's)."""
        return [c for c in self.completions if not c.finished]

    @property
    def resumed(self) -> bool:
        """Its prompt is computed again after a preemption, to be forked once more (without prefix sharing, a
        request of several completions resumes so): not forked, yet its completions have tokens."""
        return not self.forked and any(c.token_ids for c in self.completions)

    def units(self) -> list[tuple[Completion | None, Sequence | None, list[int]]]:
        """Work units: ``(completion or None for the shared prompt, its sequence, all its tokens)``."""
        if not self.forked:
            return [(None, self.prompt_seq, list(self.prompt_ids))]
        return [(c, c.seq, [*self.prompt_ids, *c.token_ids]) for c in self.live_completions]

    def sequences(self) -> list[Sequence]:
        seqs = [c.seq for c in self.completions if c.seq is not None]
        if self.prompt_seq is not None:
            seqs.append(self.prompt_seq)
        return seqs


@dataclass
class CompletionOutput:
    """One completion's state after a step.

    ``text`` / ``token_ids`` are everything so far (text only as far as released, see :class:`Completion`);
    ``delta_text`` / ``delta_token_ids`` / ``delta_logprobs`` what is new since the request's previous output.
    """

    index: int
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter time each token was produced

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (``time.perf_counter`` seconds, except ``created``: Unix seconds) and counts."""

    arrival_time: float
    created: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_preemptions: int

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival until first scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (over all completions' tokens)."""
        if self.last_token_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's state after a step: for ``n == 1`` ``.text`` / ``.token_ids`` are its completion's;
    ``.outputs`` has all. ``error`` is set when the request failed (``finish_reason == "error"``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    error_code: ErrorCode | None = None  # why it failed, when ``error`` is set

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    def then(self, newer: RequestOutput) -> RequestOutput:
        """``newer`` with this output's deltas prepended: one output standing for both, for a consumer that
        fell behind (its memory stays that of one output however many steps it missed)."""
        old = {c.index: c for c in self.outputs}
        for c in newer.outputs:
            o = old.get(c.index)
            if o is None:
                continue
            c.delta_text = o.delta_text + c.delta_text
            c.delta_token_ids = o.delta_token_ids + c.delta_token_ids
            if c.delta_logprobs is not None and o.delta_logprobs is not None:
                c.delta_logprobs = o.delta_logprobs + c.delta_logprobs
        return newer

    @classmethod
    def of(cls, r: Request, report: bool = False) -> RequestOutput:
        """The request's state; ``report=True`` also marks it as sent (the next output's deltas start here)."""
        outputs = []
        for c in r.completions:
            n_tok, n_chr = c.num_reported_tokens, c.num_reported_chars
            text = c.text[: c.num_released]
            outputs.append(CompletionOutput(
                index=c.index, text=text, token_ids=list(c.token_ids), delta_text=text[n_chr:],
                delta_token_ids=c.token_ids[n_tok:], finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                logprobs=None if c.logprobs is None else list(c.logprobs),
                delta_logprobs=None if c.logprobs is None else c.logprobs[n_tok:],
                token_times=list(c.token_times)))
            if report:
                c.num_reported_tokens, c.num_reported_chars = len(c.token_ids), len(text)
        last = max((c.token_times[-1] for c in r.completions if c.token_times), default=None)
        metrics = RequestMetrics(r.arrival_time, r.created, r.first_scheduled_time, r.first_token_time, last,
                                 r.finish_time, len(r.prompt_ids), r.num_cached_tokens,
                                 sum(len(c.token_ids) for c in r.completions), r.num_preemptions)
        code = None if r.error is None else (r.error_code or ErrorCode.ENGINE)
        return cls(r.request_id, r.prompt, r.prompt_ids, outputs, r.finished, metrics, r.prompt_logprobs, r.error,
                   code)


def describe(value: Any) -> str:
    """A short description of an exception for a failed request's ``error``."""
    return f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
