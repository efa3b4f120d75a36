"""Iteration-level scheduling: which tokens of which requests one engine step computes, and room for them.

Every step: running decodes first (one token each), then running prefills in chunks within the token budget,
then new requests while budget, sequence slots and cache room last (room for the new prompt beside what the
running requests still need for their known tokens and one more token each, so that admitting it preempts
nothing a few steps later). A waiting request whose prompt another request is prefilling (a new shared
prompt) waits until that prefill is in the cache, so that it hits it. The scheduler then makes room for the
step's tokens in the cache; when the pool is short it preempts the newest request (releases its sequences; it
goes back to the front of the queue and recomputes later). Preemption happens only here.

Which waiting request goes first (``SchedulerConfig.policy``): "cache-aware" (the default) tries the first
:data:`ADMISSION_WINDOW` waiting requests in order of the prompt tokens each still has to compute after the
prefix cache (ties in arrival order): a request whose prompt is mostly cached costs the step little and gets
its first token at once instead of queueing behind other prompts' long prefills (8 system prompts shared by 32
requests arriving at once: the median request no longer waits for nearly every prompt). So that nothing
starves, a request passed over ``max_overtakes`` times, and a preempted one, goes first, in arrival order.
"fcfs": arrival order.

The scheduler owns the K/V lifetimes of its requests: it adds their sequences (from one cache lookup per
sequence), forks a computed prompt into its completions (:meth:`update_from_output`), releases a completion's
sequence when it finishes, and a request's when it leaves, is preempted or aborted. The engine never calls
the cache's ``add_sequence`` / ``fork`` / ``release`` itself.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from chunkattn.cache.cache import Batch, PrefixKVCache, PrefixMatch, Sequence
from chunkattn.engine.request import Completion, ErrorCode, Request, RequestState
from chunkattn.errors import CacheFullError
from chunkattn.utils import cdiv

SCHEDULING_POLICIES = ("cache-aware", "fcfs")
ADMISSION_WINDOW = 128  # waiting requests "cache-aware" orders each step (a cache lookup each); the rest keep order


@dataclass
class SchedulerConfig:
    """``max_num_batched_tokens``: prefill tokens one step may compute (decodes come on top);
    ``max_num_seqs``: sequences running at once; ``prefix_aware``: hold back a request whose prompt another
    request is prefilling, so that it reuses that prefill; ``policy``: which waiting request is admitted first
    (:data:`SCHEDULING_POLICIES`, see the module's doc); ``max_overtakes``: with "cache-aware", how many later
    requests may be admitted before a waiting one, which then goes first."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    prefix_aware: bool = True
    policy: str = "cache-aware"
    max_overtakes: int = 64

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {list(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if self.max_overtakes < 0:
            raise ValueError(f"max_overtakes must be >= 0, got {self.max_overtakes}")


@dataclass(eq=False)
class ScheduledUnit:
    """Tokens of one sequence computed this step."""

    request: Request
    completion: Completion | None  # None: the request's shared prompt sequence
    seq: Sequence
    tokens: list[int]  # tokens computed this step
    samples: bool  # the unit's known tokens end here: sample the next token(s) from its last row
    first_pos: int = 0  # position of tokens[0] in the sequence


@dataclass
class SchedulerOutput:
    """A step's work: the units, the cache batch holding room for their tokens (None if there are no
    units), and requests that cannot run (too large for the cache even alone)."""

    units: list[ScheduledUnit]
    batch: Batch | None
    failed: list[tuple[Request, str]] = field(default_factory=list)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix, by bisection on slice equality (compared in C, not token by token)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    def __init__(self, cache: PrefixKVCache, config: SchedulerConfig):
        self.cache = cache
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.admitted_prompt_tokens = 0  # prompt tokens of requests admitted (first admission only) ...
        self.admitted_cached_tokens = 0  # ... and how many of them the prefix cache held
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _num_running_seqs(self) -> int:
        # a request not forked yet will hold one sequence per completion
        return sum(len(r.live_completions) for r in self.running)

    # ------------------------------------------------------------------ admission
    def _prompts(self, request: Request) -> list[list[int]]:
        """Token lists the request's sequences must hold once admitted."""
        if request.forked:  # resumed after preemption: each completion recomputes prompt + its output
            return [[*request.prompt_ids, *c.token_ids] for c in request.live_completions]
        return [list(request.prompt_ids)]

    def _lookup(self, request: Request) -> list[PrefixMatch]:
        """One cache lookup per sequence the request will hold: what admission decides from."""
        return [self.cache.lookup(p, request.cache_salt, checked=True) for p in self._prompts(request)]

    def _admit(self, request: Request, matches: list[PrefixMatch]) -> None:
        """Give the request its sequences, reusing the longest cached prefix of each (unless it wants the
        logprobs of every prompt token, which must then be computed)."""
        cache = self.cache
        if request.forked:
            for c, m in zip(request.live_completions, matches, strict=True):
                c.seq = cache.add_sequence(m.token_ids, namespace=request.cache_salt, match=m)
        else:
            (m,) = matches
            reuse = request.params.prompt_logprobs is None
            request.prompt_seq = cache.add_sequence(m.token_ids, reuse_prefix=reuse, namespace=request.cache_salt,
                                                    match=m)
            if not request.admitted:
                request.num_cached_tokens = request.prompt_seq.num_cached_tokens
                self.admitted_prompt_tokens += len(request.prompt_ids)
                self.admitted_cached_tokens += request.num_cached_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.perf_counter()
        request.admitted = True
        request.state = RequestState.RUNNING
        self.running.append(request)

    def _room_to_go_on(self, request: Request) -> int:
        """Chunks a running request may still take before its sequences' next token: its known tokens that the
        cache does not hold yet (a prompt being prefilled, or admitted this step and not computed yet; a resumed
        request's output) and one more token per sequence (the room a decode takes within the next
        ``chunk_size`` steps), each counted as if no chunk it holds had room left."""
        c = self.cache.chunk_size
        if not request.forked:
            computed = request.prompt_seq.num_tokens if request.prompt_seq is not None else 0
            return (cdiv(len(request.prompt_ids) - computed, c)
                    + sum(cdiv(len(comp.token_ids) + 1, c) for comp in request.live_completions))
        return sum(cdiv(len(request.prompt_ids) + len(comp.token_ids) - comp.seq.num_tokens + 1, c)
                   for comp in request.live_completions if comp.seq is not None)

    def _can_admit(self, matches: list[PrefixMatch], reserved: int) -> bool:
        """Whether the pool (free plus evictable chunks) could hold the request's uncomputed prompt tokens (and
        the retained chunks its cached prefix takes out of the evictable ones) beside ``reserved``, what the
        running requests may take before their next tokens (:meth:`_room_to_go_on`): admitting a request that
        leaves them no room to grow would only get the newest preempted (and recomputed) a few steps later."""
        return self.cache.can_allocate(self.cache.room_needed(matches) + reserved)

    def _defer(self, request: Request, matches: list[PrefixMatch]) -> bool:
        """Whether another request is prefilling a longer prefix of this prompt than the cache holds."""
        if not self.config.prefix_aware or request.forked:
            return False
        cached = matches[0].num_cached_tokens
        for other in self.running:
            seq = other.prompt_seq
            if (other.forked or seq is None or seq.num_tokens >= len(other.prompt_ids)
                    or other.cache_salt != request.cache_salt):
                continue
            if _common_prefix(request.prompt_ids, other.prompt_ids) > cached + self.cache.chunk_size:
                return True
        return False

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Choose this step's units and extend the cache for them (preempting if the pool is short)."""
        units: list[ScheduledUnit] = []
        budget = self.config.max_num_batched_tokens
        prefills: list[tuple[Request, Completion | None, Sequence]] = []
        for r in self.running:
            if not r.forked:
                assert r.prompt_seq is not None
                if r.prompt_seq.num_tokens < len(r.prompt_ids) or not r.resumed:
                    prefills.append((r, None, r.prompt_seq))
                    continue
                self._fork(r, live_only=True)  # a resumed request's prompt is computed: its completions go on
            for c in r.completions:
                if c.finished:
                    continue
                assert c.seq is not None
                pending = len(r.prompt_ids) + len(c.token_ids) - c.seq.num_tokens
                if pending == 1:
                    units.append(ScheduledUnit(r, c, c.seq, c.token_ids[-1:], True, c.seq.num_tokens))
                else:
                    prefills.append((r, c, c.seq))
        for r, pc, seq in prefills:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(units, r, pc, seq, budget)
        if self.waiting and budget > 0 and (not self.running or self._num_running_seqs() < self.config.max_num_seqs):
            self._admit_waiting(units, budget)
        return self._allocate(units)

    def _admit_waiting(self, units: list[ScheduledUnit], budget: int) -> None:
        """Admit waiting requests in the policy's order while budget, sequence slots and cache room last, and
        schedule their first prefill chunks. The first request that does not fit ends admission (nothing behind
        it may pass it for room); a request whose prompt another is prefilling is passed over (see _defer)."""
        window, order, looked_up = self._admission_order()
        admitted: set[int] = set()
        reserved = sum(map(self._room_to_go_on, self.running))
        for r in order:
            if budget <= 0:
                break
            need = len(r.live_completions)
            if self.running and self._num_running_seqs() + need > self.config.max_num_seqs:
                break
            matches = looked_up.get(id(r))  # the ordering's lookup, while nothing changed the cache since
            if matches is None or not all(self.cache.is_current(m) for m in matches):
                matches = self._lookup(r)
            if self.running and not self._can_admit(matches, reserved):
                break
            if self._defer(r, matches):
                continue
            self.waiting.remove(r)
            admitted.add(id(r))
            self._admit(r, matches)
            reserved += self._room_to_go_on(r)
            for uc, useq, _ in r.units():
                assert useq is not None
                if budget <= 0:
                    break
                budget -= self._prefill_chunk(units, r, uc, useq, budget)
        # each request of the window still waiting was overtaken by every admitted request behind it in the queue
        behind = len(admitted) - sum(id(r) in admitted for r in window)  # (admitted from past the window)
        for r in reversed(window):
            if id(r) in admitted:
                behind += 1
            else:
                r.overtaken += behind

    def _admission_order(self) -> tuple[list[Request], list[Request], dict[int, list[PrefixMatch]]]:
        """(the window the policy ordered, every waiting request in the order admission tries them, the lookups
        the order came from by id(request))."""
        if self.config.policy == "fcfs" or len(self.waiting) < 2:
            return [], list(self.waiting), {}
        window = list(itertools.islice(self.waiting, ADMISSION_WINDOW))
        rest = list(itertools.islice(self.waiting, ADMISSION_WINDOW, None))
        due = [r for r in window if r.num_preemptions or r.overtaken >= self.config.max_overtakes]
        if len(due) == len(window):
            return window, window + rest, {}
        taken = {id(r) for r in due}
        others = [r for r in window if id(r) not in taken]
        looked_up = {id(r): self._lookup(r) for r in others}
        others.sort(key=lambda r: self._tokens_to_compute(r, looked_up[id(r)]))  # stable: ties keep arrival order
        return window, due + others + rest, looked_up

    @staticmethod
    def _tokens_to_compute(request: Request, matches: list[PrefixMatch]) -> int:
        """Prompt tokens admitting the request now would compute: those past its cached prefix, and at least the
        last one (whose logits are needed)."""
        if request.params.prompt_logprobs is not None:  # recomputes its prompt
            return sum(len(m.token_ids) for m in matches)
        return sum(m.num_new_tokens for m in matches)

    @staticmethod
    def _prefill_chunk(units: list[ScheduledUnit], r: Request, c: Completion | None, seq: Sequence,
                       budget: int) -> int:
        """Schedule up to ``budget`` of the unit's uncomputed tokens; return how many."""
        start = seq.num_tokens
        total = len(r.prompt_ids) + (len(c.token_ids) if c is not None else 0)
        end = min(total, start + budget)
        chunk = [*r.prompt_ids[start:end]]
        if c is not None and end > len(r.prompt_ids):
            chunk += c.token_ids[max(0, start - len(r.prompt_ids)) : end - len(r.prompt_ids)]
        # (a resumed request's prompt samples nothing: its completions have their tokens)
        units.append(ScheduledUnit(r, c, seq, chunk, end == total and (c is not None or not r.resumed), start))
        return len(chunk)

    def _allocate(self, units: list[ScheduledUnit]) -> SchedulerOutput:
        """Room in the cache for every unit's tokens; preempts the newest requests while the pool is short."""
        failed: list[tuple[Request, str]] = []
        while units:
            try:
                batch = self.cache.extend([u.seq for u in units], [u.tokens for u in units])
                return SchedulerOutput(units, batch, failed)
            except CacheFullError as exc:
                oldest = self.running[0]
                victim = self.preempt_newest(keep=oldest)
                if victim is None:  # the oldest request alone does not fit: it can never run
                    victim = oldest
                    self._release(victim)
                    self.running.remove(victim)
                    victim.state = RequestState.FINISHED
                    victim.error_code = ErrorCode.INVALID_REQUEST
                    failed.append((victim, f"the request needs more K/V than the cache holds ({exc}); raise "
                                           f"the cache size or lower max_tokens"))
                units = [u for u in units if u.request is not victim]
        return SchedulerOutput([], None, failed)

    # ------------------------------------------------------------------ after the step
    def update_from_output(self, requests: Iterable[Request]) -> None:
        """After the engine appended a step's sampled tokens (and finished the completions that stopped):
        a request whose prompt was just computed forks it into its completions' sequences (completion 0
        continues it, the others share it; nothing is copied); a finished completion's sequence is released at
        once; a request whose completions all finished leaves (its chunks stay cached for later prefixes)."""
        for r in requests:
            if r.state is not RequestState.RUNNING:  # failed this step: already released
                continue
            if not r.forked:
                self._fork(r)
            for c in r.completions:
                if c.finished and c.seq is not None:
                    self.cache.release(c.seq)
                    c.seq = None
            if all(c.finished for c in r.completions):
                self.finish(r)

    def _fork(self, r: Request, live_only: bool = False) -> None:
        """The prompt is computed: the first completion continues its sequence, the others fork it (no copy);
        ``live_only`` (a resumed request): completions that finished before its preemption get none."""
        assert r.prompt_seq is not None
        for i, c in enumerate(r.live_completions if live_only else r.completions):
            c.seq = r.prompt_seq if i == 0 else self.cache.fork(r.prompt_seq)
        r.prompt_seq = None
        r.forked = True

    # ------------------------------------------------------------------ leaving
    def _release(self, request: Request) -> None:
        for seq in request.sequences():
            self.cache.release(seq)
        request.prompt_seq = None
        for c in request.completions:
            c.seq = None

    def preempt_newest(self, keep: Request | None = None) -> Request | None:
        """Release the newest running request (not ``keep``) so that older ones can go on; None if none."""
        for r in reversed(self.running):
            if r is not keep:
                self._release(r)
                if r.forked and not self.cache.share_prefixes and len(r.live_completions) > 1:
                    # without prefix sharing its completions, resumed one by one, would each hold the prompt
                    # again (more K/V than the request ever took, maybe more than the pool): it resumes as one
                    # prompt again, forked once computed
                    r.forked = False
                r.state = RequestState.WAITING
                r.num_preemptions += 1
                self.num_preemptions += 1
                self.running.remove(r)
                self.waiting.appendleft(r)
                return r
        return None

    def finish(self, request: Request) -> None:
        """A request whose completions are all done leaves; its chunks stay cached for later prefixes."""
        self._release(request)
        request.state = RequestState.FINISHED
        self.running.remove(request)

    def abort(self, request: Request) -> None:
        """Remove a waiting, running or preempted request at once and release its sequences."""
        self._release(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.state = RequestState.FINISHED
