"""Routing requests among engine replicas so that requests sharing a prefix meet the replica that caches it.

Plain Python, no Ray: the Ray Serve request router and the simulator both drive this core.

A prompt is cut into blocks of ``block_size`` tokens, and block ``i`` is named by a hash chained over blocks
``0..i`` (so equal hashes mean equal prefixes; see :mod:`chunkattn.cache.block_hash`). Per replica the
router keeps an approximate set of the block hashes it sent there (:class:`PrefixIndex`), least recently used
first out, capped at the replica's K/V capacity in blocks, and replaced by what the replica reports it holds
(:meth:`Router.report`).

Policies: :class:`PrefixAwarePolicy` (the longest cached match, unless the load is imbalanced: then the least
loaded, as SGLang's cache-aware router does), and the baselines :class:`RoundRobinPolicy` and
:class:`PowerOfTwoPolicy`.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from chunkattn.cache.block_hash import block_hashes


class PrefixIndex:
    """The block hashes a replica (probably) holds, least recently used first, at most ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def blocks(self) -> list[int]:
        """The held block hashes, most recently used first (the order :meth:`replace` takes)."""
        return list(reversed(self._blocks))

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` held (a prefix is only usable up to its first missing block)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that a prompt's blocks are now cached (most recently used), evicting the oldest past capacity.
        The prompt's last block becomes the oldest of them and its first the newest: as in the engine's tree,
        a prefix loses its end before its start (a start without its end still matches, not the reverse)."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def replace(self, hashes: Sequence[int]) -> None:
        """What the replica reported it holds, shortest prefixes first (as ``PrefixKVCache.block_hashes``
        lists them): the deepest blocks become the first to go."""
        self._blocks = OrderedDict.fromkeys(reversed(hashes))
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclass
class ReplicaState:
    """What the router knows of one replica.

    ``inflight``: requests this router sent there and that have not finished (exact); ``others``: requests
    the replica had from elsewhere (other routers) at its last report, i.e. its reported queue beyond this
    router's in-flight requests *when the report was taken* (``changes`` remembers them). ``load`` is their
    sum. (A report replacing the load outright is stale by whatever was sent or finished since it was taken:
    a burst would pile onto a replica that reported an empty queue a moment ago.)
    """

    replica_id: str
    capacity_blocks: int
    index: PrefixIndex = field(init=False)
    recent: deque[tuple[float, list[int]]] = field(default_factory=deque)  # (time, block hashes) sent lately
    changes: deque[tuple[float, int, int]] = field(default_factory=deque)  # (time, inflight before, after)
    inflight: int = 0
    others: int = 0
    free_blocks: int | None = None

    def __post_init__(self) -> None:
        self.index = PrefixIndex(self.capacity_blocks)

    @property
    def load(self) -> int:
        return self.inflight + self.others

    def set_inflight(self, value: int, now: float, keep_s: float) -> None:
        self.changes.append((now, self.inflight, value))
        self.inflight = value
        while len(self.changes) > 1 and self.changes[0][0] < now - keep_s:
            self.changes.popleft()

    def inflight_at(self, t: float) -> int:
        """This router's in-flight requests there at time ``t`` (as far back as ``changes`` reach)."""
        for when, _, after in reversed(self.changes):
            if when <= t:
                return after
        return self.changes[0][1] if self.changes else self.inflight


@dataclass
class RoutingStats:
    """What a replica reports (``record_routing_stats`` in Ray Serve): its queue (waiting + running requests),
    its free K/V blocks and the block hashes of the prefixes it holds (None: keep the router's estimate)."""

    queue_len: int
    free_blocks: int | None = None
    held_blocks: list[int] | None = None
    taken_at: float | None = None  # when (the router's ``clock``; None: now)


class RoutingPolicy:
    """Chooses a replica for a request; see :class:`Router`."""

    name = "policy"

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[int]) -> ReplicaState:
        raise NotImplementedError


def _least_loaded(replicas: Sequence[ReplicaState], rng: random.Random | None = None) -> ReplicaState:
    """The least loaded replica; among equals the one caching least (room for a new prefix), then at random."""
    low = min((r.load, len(r.index)) for r in replicas)
    tied = [r for r in replicas if (r.load, len(r.index)) == low]
    return tied[0] if rng is None or len(tied) == 1 else rng.choice(tied)


class RoundRobinPolicy(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[int]) -> ReplicaState:
        r = replicas[self._next % len(replicas)]
        self._next += 1
        return r


class PowerOfTwoPolicy(RoutingPolicy):
    """Two replicas at random, the less loaded of them (Ray Serve's default)."""

    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[int]) -> ReplicaState:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self.rng.sample(list(replicas), 2)
        return a if a.load <= b.load else b


class PrefixAwarePolicy(RoutingPolicy):
    """The replica holding the longest prefix of the prompt; ties go to the least loaded of them.

    A prompt shorter than a block goes to the least loaded replica. A miss (a new prefix, or a match shorter
    than ``min_match_blocks``) goes to the replica caching the fewest blocks among those within
    ``balance_abs`` requests of the least loaded (then the least loaded of them): new prefixes spread over
    the replicas like tenants, as Ray's prefix router sends them to its "smallest tenant". (Sending a miss to
    the least loaded replica of the moment piles prefixes onto whichever replica happened to be idle: 8
    prompts on 4 replicas went 3/3/1/1 instead of 2/2/2/2.)

    When the load is imbalanced (the busiest replica has more than ``balance_abs`` requests more than the
    idlest *and* more than ``balance_rel`` times as many), the least loaded replica gets the request whatever
    it caches, so that one hot prefix cannot pile every request onto one replica.
    """

    name = "prefix-aware"

    def __init__(self, balance_abs: int = 8, balance_rel: float = 1.5, min_match_blocks: int = 1, seed: int = 0):
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.min_match_blocks = min_match_blocks
        self.rng = random.Random(seed)

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[int]) -> ReplicaState:
        loads = [r.load for r in replicas]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * max(lo, 1):
            return _least_loaded(replicas, self.rng)
        if not hashes:  # nothing to cache (shorter than a block): only the load matters
            return _least_loaded(replicas, self.rng)
        matches = [r.index.match(hashes) for r in replicas]
        best = max(matches)
        if best < self.min_match_blocks:
            near = [r for r in replicas if r.load <= lo + self.balance_abs]
            least = min(len(r.index) for r in near)
            return _least_loaded([r for r in near if len(r.index) == least], self.rng)
        return _least_loaded([r for r, m in zip(replicas, matches) if m == best], self.rng)


POLICIES = {"prefix-aware": PrefixAwarePolicy, "round-robin": RoundRobinPolicy, "power-of-two": PowerOfTwoPolicy}


def make_policy(name: str, **options: float) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](**options)


class Router:
    """Replicas, their prefix indexes and loads, and a policy. Not thread-safe: one caller at a time.

    ``block_size``: tokens per hashed block (the engines' chunk size is a good choice). ``recent_s``: how
    old a report may be when it arrives (seconds of ``clock``): prompts sent within that time are kept in the
    index when a report replaces it, as the report may predate them (0: reports are current, as in the
    simulator). ``clock``: seconds, comparable with the reports' ``taken_at`` (wall time across machines).
    """

    def __init__(self, policy: RoutingPolicy | str = "prefix-aware", block_size: int = 64, recent_s: float = 0.0,
                 clock: Callable[[], float] = time.time):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.block_size = block_size
        self.recent_s = recent_s
        self.clock = clock
        self.replicas: dict[str, ReplicaState] = {}

    def add_replica(self, replica_id: str, capacity_tokens: int) -> None:
        """A replica whose K/V cache holds ``capacity_tokens`` tokens (its prefix index is capped there)."""
        self.replicas[replica_id] = ReplicaState(replica_id, capacity_tokens // self.block_size)

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica (it died or was scaled away) and its prefix index."""
        self.replicas.pop(replica_id, None)

    def blocks(self, token_ids: Sequence[int], namespace: str | None = None) -> list[int]:
        """The names of a prompt's blocks (:func:`~chunkattn.cache.block_hash.block_hashes`); ``namespace``:
        the request's cache salt (its prefixes match only the same salt's, as in the engines' caches)."""
        return block_hashes(token_ids, self.block_size, namespace)

    def route(self, token_ids: Sequence[int], exclude: Iterable[str] = (), namespace: str | None = None) -> str:
        """The replica for a prompt (:meth:`choose`), recorded as sent there (:meth:`record`)."""
        blocks = self.blocks(token_ids, namespace)
        replica_id = self.choose(blocks, exclude)
        self.record(replica_id, blocks)
        return replica_id

    def choose(self, blocks: Sequence[int], exclude: Iterable[str] = ()) -> str:
        """The replica the policy picks for a prompt's :meth:`blocks`, without recording anything (a caller
        that may not send the request there, such as Ray Serve's router when the replica turns out full,
        records later). ``exclude``: replicas not to use (e.g. one that just failed this request)."""
        skip = set(exclude)
        candidates = [r for r in self.replicas.values() if r.replica_id not in skip]
        if not candidates:
            raise LookupError("no replica is available")
        return self.policy.choose(candidates, blocks).replica_id

    def record(self, replica_id: str, blocks: Sequence[int]) -> None:
        """A prompt was sent to ``replica_id``: its :meth:`blocks` join that replica's index and it counts as
        load until :meth:`finished`."""
        r = self.replicas.get(replica_id)
        if r is None:
            return
        hashes = list(blocks)
        r.index.insert(hashes)
        now = self.clock()
        if self.recent_s > 0:
            r.recent.append((now, hashes))
        r.set_inflight(r.inflight + 1, now, self.recent_s)

    def match(self, replica_id: str, token_ids: Sequence[int], namespace: str | None = None) -> int:
        """Tokens of the prompt's prefix the router believes ``replica_id`` caches."""
        return self.replicas[replica_id].index.match(self.blocks(token_ids, namespace)) * self.block_size

    def finished(self, replica_id: str) -> None:
        """A request sent to ``replica_id`` finished (or failed)."""
        r = self.replicas.get(replica_id)
        if r is not None and r.inflight > 0:
            r.set_inflight(r.inflight - 1, self.clock(), self.recent_s)

    def report(self, replica_id: str, stats: RoutingStats) -> None:
        """Correct the estimate with what the replica says of itself."""
        r = self.replicas.get(replica_id)
        if r is None:
            return
        then = r.inflight if stats.taken_at is None else r.inflight_at(stats.taken_at)
        r.others = max(0, stats.queue_len - then)
        r.free_blocks = stats.free_blocks
        if stats.held_blocks is not None:
            r.index.replace(stats.held_blocks)
            since = self.clock() - self.recent_s
            while r.recent and r.recent[0][0] < since:
                r.recent.popleft()
            for _, hashes in r.recent:
                r.index.insert(hashes)
