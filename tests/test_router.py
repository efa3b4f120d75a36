"""The prefix-aware router core (no Ray): block hashing, per-replica indexes, policies, reports, removal."""

from __future__ import annotations

import random

import pytest
import torch

from chunkattn import PrefixKVCache
from chunkattn.cluster import PrefixIndex, Router, RoutingStats, block_hashes
from helpers import store_prefix_kv


def _prompt(system: int, question: int, shared: int = 256, own: int = 40) -> list[int]:
    rng = random.Random(system)
    head = [rng.randrange(1000) for _ in range(shared)]
    rng = random.Random(10_000 + question)
    return head + [rng.randrange(1000) for _ in range(own)]


def test_block_hash_values_are_a_contract():
    """Routers and replicas in different processes, Python versions and machines must name a prefix alike:
    the values are pinned (a change of the function is a change of the wire contract)."""
    import os
    import subprocess
    import sys

    from chunkattn.cache.block_hash import chain, namespace_seed

    assert chain(0, (1, 2, 3)) == 16958249009808338657
    assert block_hashes(list(range(10)), 4) == [2141542520064864664, 15377408733496924908]
    assert block_hashes(list(range(8)), 4, "t")[0] == 2239441155294403982 and namespace_seed(None) == 0
    other = subprocess.run([sys.executable, "-c", "from chunkattn.cluster import block_hashes; "
                            "print(block_hashes(list(range(100)), 16, 'salt'))"], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == str(block_hashes(list(range(100)), 16, "salt"))


def test_block_hashes_name_prefixes():
    a, b = list(range(100)), list(range(64)) + [7] * 36
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 6 and ha[:4] == hb[:4] and ha[4] != hb[4]
    assert block_hashes(a[:15], 16) == []
    assert block_hashes([1, 2] * 8, 16) != block_hashes([2, 1] * 8, 16)


def test_index_is_lru_capped_and_matches_leading_blocks():
    idx = PrefixIndex(capacity=3)
    idx.insert([1, 2, 3])
    assert idx.match([1, 2, 3, 4]) == 3 and idx.match([2, 3]) == 2 and idx.match([9, 1]) == 0
    idx.insert([1, 4])  # a prefix loses its end first: 3, the deepest block of the first prompt, goes
    assert 3 not in idx and 1 in idx and 2 in idx and len(idx) == 3
    assert idx.match([1, 2, 3]) == 2 and idx.match([1, 4]) == 2


def test_prefix_aware_sends_a_prefix_back_to_its_replica():
    router = Router("prefix-aware", block_size=16)
    for i in range(4):
        router.add_replica(f"r{i}", capacity_tokens=4096)
    homes = {}
    for q in range(40):
        s = q % 4
        rid = router.route(_prompt(s, q))
        homes.setdefault(s, set()).add(rid)
        router.finished(rid)
    assert all(len(h) == 1 for h in homes.values())  # each system prompt stays on one replica
    assert len(set().union(*homes.values())) == 4  # misses spread over the least loaded replicas


def test_round_robin_and_power_of_two_ignore_prefixes():
    for policy in ("round-robin", "power-of-two"):
        router = Router(policy, block_size=16)
        for i in range(4):
            router.add_replica(f"r{i}", 4096)
        seen = {router.route(_prompt(0, q)) for q in range(20)}
        assert len(seen) >= 3, policy


def test_imbalance_overrides_affinity():
    router = Router("prefix-aware", block_size=16)
    router.add_replica("a", 4096)
    router.add_replica("b", 4096)
    first = router.route(_prompt(0, 0))
    placed = [router.route(_prompt(0, q)) for q in range(1, 30)]  # none finish: load piles up
    assert placed[0] == first
    assert placed.count(first) < 29 and 0 < placed.count("b" if first == "a" else "a")


def test_reports_correct_the_estimate_and_removal_reroutes():
    router = Router("prefix-aware", block_size=16)
    router.add_replica("a", 4096)
    router.add_replica("b", 4096)
    p = _prompt(3, 1)
    home = router.route(p)
    other = "b" if home == "a" else "a"
    router.finished(home)
    # the home replica evicted the prompt, the other one computed it meanwhile (as its report says)
    router.report(home, RoutingStats(queue_len=0, held_blocks=[]))
    router.report(other, RoutingStats(queue_len=0, held_blocks=block_hashes(p, 16)))
    assert router.route(_prompt(3, 2)) == other
    router.remove_replica(other)
    assert router.route(p) == home and set(router.replicas) == {home}
    assert router.route(p, exclude=[]) == home
    with pytest.raises(LookupError):
        router.route(p, exclude=[home])


def test_a_cache_reports_the_hashes_the_router_computes():
    cache = PrefixKVCache(1, 1, 8, chunk_size=16, max_tokens=2048, dtype=torch.float32)
    prompts = [_prompt(1, 1), _prompt(1, 2), _prompt(2, 3)]
    for p in prompts:
        seq = cache.add_sequence(p)
        store_prefix_kv(cache, cache.extend([seq], [p[seq.num_cached_tokens:]]))
    salted = _prompt(1, 4)  # a tenant's copy of a common prompt: its own names, not the common ones
    seq = cache.add_sequence(salted, namespace="tenant-a")
    store_prefix_kv(cache, cache.extend([seq], [salted]))
    want = set().union(*(block_hashes(p, 32) for p in prompts))
    assert set(cache.block_hashes(32)) == want | set(block_hashes(salted, 32, "tenant-a"))
    assert not set(block_hashes(salted, 32, "tenant-a")) & set(block_hashes(salted, 32))
    assert len(cache.block_hashes(32, limit=3)) == 3


def test_simulator_conserves_requests_and_ranks_prefix_routing_first():
    from chunkattn.cluster.simulator import CostModel, Workload, simulate

    cost = CostModel.cpu_smollm2_2core(kv_capacity_tokens=1152)  # 2 of the 8 system prompts per replica
    w = Workload(requests=160, tenants=8, shared_len=512, question_len=32, output_len=8, rate=6.0, seed=5)
    rows = {p: simulate(p, 4, w, cost) for p in ("prefix-aware", "round-robin", "power-of-two")}
    for r in rows.values():
        assert sum(r["requests_per_replica"]) == 160 and 0 <= r["hit_rate"] < 1
        assert r["output_tokens_per_s"] > 0 and r["ttft_p50_s"] <= r["ttft_p90_s"]
    pa, rr = rows["prefix-aware"], rows["round-robin"]
    assert pa["hit_rate"] >= 2 * rr["hit_rate"] and pa["ttft_p50_s"] < rr["ttft_p50_s"]
    assert pa["output_tokens_per_s"] >= 0.99 * rr["output_tokens_per_s"]
    # no sharing across tenants at all: every router's hit rate is what repeats within a replica
    one = simulate("round-robin", 1, Workload(requests=20, tenants=1, shared_len=256, question_len=16, output_len=4,
                                              rate=1.0), cost)
    assert one["hit_rate"] > 0.8  # one replica, one tenant: everything after the first request hits


def test_late_reports_neither_forget_recent_prompts_nor_undo_inflight_load():
    """A report taken before the latest requests reached the replica: the prompts sent since stay in the index
    (within ``recent_s``) and the requests still in flight still count as load."""
    now = [0.0]
    router = Router("prefix-aware", block_size=16, recent_s=2.0, clock=lambda: now[0])
    router.add_replica("a", 4096)
    router.add_replica("b", 4096)
    p = _prompt(3, 1)
    home = router.route(p)
    for i in range(3):
        router.route(_prompt(4 + i, 1))
    loads = {k: r.load for k, r in router.replicas.items()}
    now[0] = 1.0
    router.report(home, RoutingStats(queue_len=0, held_blocks=[], taken_at=0.0))  # before anything arrived
    assert router.replicas[home].load == loads[home]
    assert router.route(_prompt(3, 2)) == home
    router.finished(home)
    now[0] = 5.0  # a report newer than the prompt, which the replica then no longer held
    router.report(home, RoutingStats(queue_len=7, held_blocks=[], taken_at=4.5))
    assert router.match(home, p) == 0
    # seven requests queued there, some from elsewhere: those beyond this router's own count as load too
    assert router.replicas[home].load == 7 and router.replicas[home].others == 7 - router.replicas[home].inflight
    # a late report of a long queue (taken while this router had 20 requests there, all finished since)
    for _ in range(20):
        router.record(home, router.blocks(p))
    now[0] = 6.0
    while router.replicas[home].inflight:
        router.finished(home)
    now[0] = 7.0
    router.report(home, RoutingStats(queue_len=20, taken_at=5.5))
    assert router.replicas[home].load == 0


def test_new_prefixes_spread_like_tenants_whatever_the_momentary_load():
    """8 system prompts arriving while 4 replicas are unevenly (but not overly) busy: 2 prompts each, so no
    replica ends up with 3 busy prefixes while another has 1."""
    rng = random.Random(3)
    router = Router("prefix-aware", block_size=16)
    for name in "abcd":
        router.add_replica(name, 1 << 16)
    homes = {}
    for tenant in range(8):
        for r in router.replicas.values():  # some requests in flight, some finished: loads 0..4
            r.inflight = rng.randrange(5)
        homes[tenant] = router.route(_prompt(tenant, 0))
    assert sorted(list(homes.values()).count(n) for n in "abcd") == [2, 2, 2, 2]
    for tenant, home in homes.items():  # and each tenant's later requests go home
        for r in router.replicas.values():
            r.inflight = rng.randrange(5)
        assert router.route(_prompt(tenant, 1)) == home


def test_a_salted_prompt_matches_only_its_own_salt():
    router = Router("prefix-aware", block_size=16)
    router.add_replica("a", 4096)
    router.add_replica("b", 4096)
    p = _prompt(5, 1)
    home = router.route(p, namespace="t1")
    assert router.match(home, p, namespace="t1") >= 256 and router.match(home, p) == 0
    assert router.match(home, p, namespace="t2") == 0
    assert router.route(_prompt(5, 2), namespace="t1") == home


def test_prompts_shorter_than_a_block_spread_by_load():
    router = Router("prefix-aware", block_size=16)
    for name in "ab":
        router.add_replica(name, 4096)
    router.route(_prompt(1, 1))  # one replica caches something, the other nothing
    for i in range(6):
        router.route(list(range(5 + i)))
    loads = sorted(r.load for r in router.replicas.values())
    assert loads == [3, 4]  # 7 requests in flight, spread by load (not all to the replica caching least)
