"""Property-based: the prefix-aware router's bookkeeping and choices under random traffic, replica changes and
reports (the plain-Python core that the Ray Serve router and the simulator drive).

A state machine adds and removes replicas of random K/V capacities, routes prompts that share prefixes (some
excluding a replica), finishes requests and delivers reports (queue lengths, held blocks). After each action:
every route went to a replica that exists and was not excluded (none left: ``LookupError``); in-flight counts equal
the requests routed there and not finished; no prefix index exceeds its capacity; a routed prompt's leading blocks
are then in its replica's index (as many as the capacity holds); and the policy's rules held: when the load is
imbalanced the least loaded replica was chosen, otherwise one of those holding the longest cached prefix (or, for
a miss, one caching the fewest blocks among the nearly least loaded).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chunkattn.cluster.router import PrefixAwarePolicy, Router, RoutingStats

BLOCK = 4
NAMES = ["r0", "r1", "r2", "r3"]


class RouterMachine(RuleBasedStateMachine):
    @initialize(balance_abs=st.integers(0, 4), balance_rel=st.sampled_from([1.0, 1.5, 3.0]),
                min_match=st.integers(1, 2), seed=st.integers(0, 2**16))
    def setup(self, balance_abs, balance_rel, min_match, seed):
        self.policy = PrefixAwarePolicy(balance_abs=balance_abs, balance_rel=balance_rel,
                                        min_match_blocks=min_match, seed=seed)
        self.router = Router(self.policy, block_size=BLOCK, clock=lambda: 0.0)
        self.inflight: dict[str, int] = {}
        self.prefixes = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 50, 51, 52, 53], [70, 71, 72, 73, 74]]

    @rule(name=st.sampled_from(NAMES), capacity_blocks=st.integers(0, 12))
    def add_replica(self, name, capacity_blocks):
        if name not in self.router.replicas:
            self.router.add_replica(name, capacity_blocks * BLOCK)
            self.inflight[name] = 0

    @rule(name=st.sampled_from(NAMES))
    def remove_replica(self, name):
        self.router.remove_replica(name)
        self.inflight.pop(name, None)

    @rule(which=st.integers(0, 2), cut=st.integers(0, 12), own=st.lists(st.integers(0, 99), max_size=9),
          exclude=st.lists(st.sampled_from(NAMES), max_size=2))
    def route(self, which, cut, own, exclude):
        prompt = self.prefixes[which][:cut] + own
        blocks = self.router.blocks(prompt)
        candidates = [r for r in self.router.replicas.values() if r.replica_id not in set(exclude)]
        if not candidates:
            with pytest.raises(LookupError):
                self.router.route(prompt, exclude=exclude)
            return
        loads = {r.replica_id: r.load for r in candidates}
        matches = {r.replica_id: r.index.match(blocks) for r in candidates}
        sizes = {r.replica_id: len(r.index) for r in candidates}
        rid = self.router.route(prompt, exclude=exclude)
        assert rid in loads, (rid, exclude)
        hi, lo = max(loads.values()), min(loads.values())
        if hi - lo > self.policy.balance_abs and hi > self.policy.balance_rel * max(lo, 1) or not blocks:
            assert loads[rid] == lo  # imbalanced, or nothing to cache: the least loaded
        elif max(matches.values()) >= self.policy.min_match_blocks:
            best = max(matches.values())
            assert matches[rid] == best and loads[rid] == min(loads[r] for r in matches if matches[r] == best)
        else:  # a miss: the fewest cached blocks among those near the least loaded
            near = [r for r in loads if loads[r] <= lo + self.policy.balance_abs]
            assert rid in near and sizes[rid] == min(sizes[r] for r in near)
        self.inflight[rid] += 1
        cap = self.router.replicas[rid].capacity_blocks
        assert self.router.match(rid, prompt) == min(len(blocks), cap) * BLOCK

    @rule(name=st.sampled_from(NAMES))
    def finished(self, name):
        self.router.finished(name)  # (unknown or idle replicas: ignored)
        if self.inflight.get(name, 0) > 0:
            self.inflight[name] -= 1

    @rule(name=st.sampled_from(NAMES), queue=st.integers(0, 6), which=st.integers(0, 2), cut=st.integers(0, 12),
          held=st.booleans())
    def report(self, name, queue, which, cut, held):
        blocks = self.router.blocks(self.prefixes[which][:cut]) if held else None
        self.router.report(name, RoutingStats(queue_len=queue, held_blocks=blocks))
        r = self.router.replicas.get(name)
        if r is not None:
            assert r.others == max(0, queue - r.inflight)
            if blocks is not None:  # the report replaces the estimate (no recent window here)
                assert r.index.match(blocks) == min(len(blocks), r.capacity_blocks)

    @invariant()
    def bookkeeping(self):
        if not hasattr(self, "router"):
            return
        assert set(self.router.replicas) == set(self.inflight)
        for name, r in self.router.replicas.items():
            assert r.inflight == self.inflight[name] >= 0 and r.others >= 0
            assert len(r.index) <= r.capacity_blocks


RouterMachine.TestCase.settings = settings(max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "150")),
                                          stateful_step_count=40, deadline=None)
TestRouterMachine = RouterMachine.TestCase
