"""Iteration-level scheduling: which tokens of which requests one engine step computes.

Every step: running decodes first (one token each), then running prefills in chunks within the token budget,
then new requests in arrival order while budget and sequence slots last. A waiting request whose prompt is
being prefilled by another (a new shared prompt) waits until that prefill is in the cache, so it hits it.
Preemption releases the newest request's sequences; it goes back to the front of the queue and recomputes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from chunkattn.cache.cache import PrefixKVCache, Sequence
from chunkattn.engine.request import Completion, Request, RequestState


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # prefill token budget of one step (decodes come on top)
    max_num_seqs: int = 64  # sequences running at once
    prefix_aware: bool = True  # hold back requests whose prompt another request is prefilling

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")


@dataclass(eq=False)
class ScheduledUnit:
    request: Request
    completion: Completion | None  # None: the request's shared prompt sequence
    seq: Sequence
    tokens: list[int]  # tokens computed this step
    samples: bool  # the chunk ends the unit's known tokens: sample the next one from its last row


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, cache: PrefixKVCache, config: SchedulerConfig):
        self.cache = cache
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.admitted_prompt_tokens = 0  # prompt tokens of requests admitted (first admission only) ...
        self.admitted_cached_tokens = 0  # ... and how many of them the prefix cache held

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _num_running_seqs(self) -> int:
        return sum(len(r.units()) for r in self.running)

    def _admit(self, request: Request) -> None:
        """Give the request its sequences, reusing the longest cached prefix of each."""
        cache = self.cache
        if request.forked:  # resumed after preemption: each completion recomputes prompt + its output
            for c in request.completions:
                if not c.finished:
                    c.seq = cache.add_sequence(request.prompt_ids + c.token_ids)
        else:
            request.prompt_seq = cache.add_sequence(request.prompt_ids)
            if not request.admitted:
                request.num_cached_tokens = request.prompt_seq.num_cached_tokens
                self.admitted_prompt_tokens += len(request.prompt_ids)
                self.admitted_cached_tokens += request.num_cached_tokens
        request.admitted = True
        request.state = RequestState.RUNNING
        self.running.append(request)

    def _can_admit(self, request: Request) -> bool:
        """Whether the pool (free plus evictable chunks) could hold the request's uncomputed prompt tokens;
        admitting a request that cannot fit would only get it preempted again at once."""
        tree = self.cache.tree
        c = self.cache.chunk_size
        prompts = [request.prompt_ids + comp.token_ids for comp in request.completions if not comp.finished] \
            if request.forked else [request.prompt_ids]
        needed = sum(-(-(len(p) - self.cache.match_prefix(p)) // c) + 1 for p in prompts)
        return needed <= tree.num_free_slots + tree.num_evictable_slots

    def _defer(self, request: Request) -> bool:
        """Whether another request is prefilling a longer prefix of this prompt than the cache holds."""
        if not self.config.prefix_aware or request.forked:
            return False
        cached = self.cache.match_prefix(request.prompt_ids)
        for other in self.running:
            seq = other.prompt_seq
            if other.forked or seq is None or seq.num_tokens >= len(other.prompt_ids):
                continue
            if _common_prefix(request.prompt_ids, other.prompt_ids) > cached + self.cache.chunk_size:
                return True
        return False

    def schedule(self) -> list[ScheduledUnit]:
        units: list[ScheduledUnit] = []
        budget = self.config.max_num_batched_tokens
        prefills: list[tuple[Request, Completion | None, Sequence, list[int]]] = []
        for r in self.running:
            for c, seq, tokens in r.units():
                assert seq is not None
                pending = len(tokens) - seq.num_tokens
                if pending == 1:
                    units.append(ScheduledUnit(r, c, seq, tokens[-1:], True))
                else:
                    prefills.append((r, c, seq, tokens))
        for r, c, seq, tokens in prefills:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(units, r, c, seq, tokens, budget)
        deferred: list[Request] = []
        while self.waiting and budget > 0:
            r = self.waiting[0]
            need = r.params.n if not r.forked else sum(not c.finished for c in r.completions)
            if self.running and (self._num_running_seqs() + need > self.config.max_num_seqs
                                 or not self._can_admit(r)):
                break
            self.waiting.popleft()
            if self._defer(r):
                deferred.append(r)
                continue
            self._admit(r)
            for c, seq, tokens in r.units():
                assert seq is not None
                if budget <= 0:
                    break
                budget -= self._prefill_chunk(units, r, c, seq, tokens, budget)
        self.waiting.extendleft(reversed(deferred))
        return units

    @staticmethod
    def _prefill_chunk(units: list[ScheduledUnit], r: Request, c: Completion | None, seq: Sequence,
                       tokens: list[int], budget: int) -> int:
        """Schedule up to ``budget`` of the unit's uncomputed tokens; return how many."""
        start = seq.num_tokens
        chunk = tokens[start : start + budget]
        units.append(ScheduledUnit(r, c, seq, chunk, start + len(chunk) == len(tokens)))
        return len(chunk)

    def preempt_newest(self, keep: Request | None = None) -> Request | None:
        """Release the newest running request (not ``keep``) so that older ones can go on; None if none."""
        for r in reversed(self.running):
            if r is not keep:
                self.preempt(r)
                return r
        return None

    def preempt(self, request: Request) -> None:
        for seq in request.sequences():
            self.cache.release(seq)
        request.prompt_seq = None
        for c in request.completions:
            c.seq = None
        request.state = RequestState.WAITING
        request.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        for seq in request.sequences():
            self.cache.release(seq)
        request.prompt_seq = None
        request.state = RequestState.FINISHED
        self.running.remove(request)
