"""Requests, their completions, and what the engine reports back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from chunkattn.cache.cache import Sequence
from chunkattn.engine.sampling import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its sequences released; it will recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Completion:
    """One of a request's ``n`` completions. ``seq`` holds prompt + output tokens computed so far."""

    index: int
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    seq: Sequence | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """A prompt and its completions, with timings for metrics.

    Before its first token a request has a single sequence (the prompt, shared by all completions); at the
    first token each completion gets its own (``fork``): ``forked`` is then True.
    """

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    completions: list[Completion]
    arrival_time: float = field(default_factory=time.perf_counter)
    state: RequestState = RequestState.WAITING
    forked: bool = False
    prompt_seq: Sequence | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def units(self) -> list[tuple[Completion | None, Sequence | None, list[int]]]:
        """Work units: ``(completion or None for the shared prompt, its sequence, all its tokens)``."""
        if not self.forked:
            return [(None, self.prompt_seq, self.prompt_ids)]
        return [(c, c.seq, self.prompt_ids + c.token_ids) for c in self.completions if not c.finished]

    def sequences(self) -> list[Sequence]:
        seqs = [c.seq for c in self.completions if c.seq is not None]
        if self.prompt_seq is not None:
            seqs.append(self.prompt_seq)
        return seqs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """A request's state: for ``n == 1`` ``.text`` / ``.token_ids`` are its completion's; ``.outputs`` has all."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @classmethod
    def of(cls, r: Request) -> RequestOutput:
        outputs = [CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason) for c in r.completions]
        metrics = RequestMetrics(r.arrival_time, r.first_token_time, r.finish_time, len(r.prompt_ids),
                                 r.num_cached_tokens, sum(len(c.token_ids) for c in r.completions),
                                 r.num_preemptions)
        return cls(r.request_id, r.prompt, list(r.prompt_ids), outputs, r.finished, metrics)
