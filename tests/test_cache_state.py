"""Property-based: random add/extend/store/fork/release/eviction/overflow against a simple model.

The model is the list of live sequences' tokens. After every step: ``check()`` passes, every live sequence
reads back exactly the K/V its prefixes define (so no row was shared wrongly or overwritten), the live tokens
equal the size of the trie of live sequences (a shared prefix is stored once), torch attention matches the
reference on the batch just extended, and a failed extend left everything as it was.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from chunkattn import CacheFullError, PrefixKVCache
from helpers import assert_kv_intact, check_attention, store_prefix_kv, trie_size

tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # a tiny alphabet forces sharing


def snapshot(cache: PrefixKVCache):
    nodes = sorted(
        (n.id, tuple(n.tokens), n.slot, n.start, n.ref_count, n.parent.id if n.parent else None)
        for n in cache.tree.nodes()
    )
    seqs = [(s.seq_id, s.token_ids) for s in cache.sequences]
    return nodes, seqs, cache.stats(), cache.k_cache.clone(), cache.v_cache.clone()


def same(a, b) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


class CacheMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(chunk_size=st.sampled_from([1, 2, 3, 4, 8]), chunks=st.integers(3, 12), retain=st.booleans(),
                share=st.sampled_from([True, True, False]))
    def setup(self, chunk_size: int, chunks: int, retain: bool, share: bool) -> None:
        self.cache = PrefixKVCache(2, 2, 4, chunk_size=chunk_size, max_tokens=chunk_size * chunks,
                                   dtype=torch.float32, retain_prefixes=retain, share_prefixes=share)
        self.family: dict[int, int] = {}  # seq_id -> the add_sequence it descends from (sharing off: its group)
        self.space: dict[int, str | None] = {}  # seq_id -> its namespace (tenant); forks inherit it

    def expected_live_tokens(self) -> int:
        if self.cache.share_prefixes:  # namespaces share nothing: one trie each
            spaces: dict[str | None, list[list[int]]] = {}
            for s in self.cache.sequences:
                spaces.setdefault(self.space[s.seq_id], []).append(list(s.token_ids))
            return sum(trie_size(g) for g in spaces.values())
        groups: dict[int, list[list[int]]] = {}
        for s in self.cache.sequences:
            groups.setdefault(self.family[s.seq_id], []).append(list(s.token_ids))
        return sum(trie_size(g) for g in groups.values())

    def _extend(self, seqs, token_lists) -> None:
        before = snapshot(self.cache)
        try:
            batch = self.cache.extend(seqs, token_lists)
        except CacheFullError:
            assert same(before, snapshot(self.cache)), "a failed extend changed the cache"
            return
        store_prefix_kv(self.cache, batch)
        check_attention(self.cache, batch, 4, "torch")

    @rule(target=seqs, prompt=tokens_st, space=st.sampled_from([None, None, "a", "b"]))
    def add(self, prompt, space):
        live = [list(s.token_ids) for s in self.cache.sequences if self.space[s.seq_id] == space]
        seq = self.cache.add_sequence(prompt, namespace=space)
        lcp = max((next((i for i, (x, y) in enumerate(zip(t, prompt)) if x != y), min(len(t), len(prompt)))
                   for t in live), default=0)
        lcp = min(lcp, len(prompt) - 1)
        assert seq.num_cached_tokens <= len(prompt) - 1
        if not self.cache.share_prefixes:
            assert seq.num_cached_tokens == 0
        elif not self.cache.retain_prefixes:
            assert seq.num_cached_tokens == lcp
        else:
            assert lcp <= seq.num_cached_tokens
        assert list(seq.token_ids) == prompt[: seq.num_cached_tokens]
        self.family[seq.seq_id] = seq.seq_id
        self.space[seq.seq_id] = space
        if seq.num_cached_tokens < len(prompt):
            self._extend([seq], [prompt[seq.num_cached_tokens :]])
        return seq

    @precondition(lambda self: bool(self.cache.sequences))
    @rule(data=st.data())
    def extend(self, data):
        live = self.cache.sequences
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4, unique_by=lambda s: s.seq_id))
        token_lists = [data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5)) for _ in chosen]
        self._extend(chosen, token_lists)

    @precondition(lambda self: bool(self.cache.sequences))
    @rule(data=st.data())
    def decode_all(self, data):
        live = self.cache.sequences
        self._extend(live, [[data.draw(st.integers(0, 2))] for _ in live])

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq.released:
            return seq
        child = self.cache.fork(seq)
        assert child.token_ids == seq.token_ids
        self.family[child.seq_id] = self.family[seq.seq_id]
        self.space[child.seq_id] = self.space[seq.seq_id]
        return child

    @rule(seq=consumes(seqs))
    def release(self, seq):
        if not seq.released:
            self.cache.release(seq)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        cache = self.cache
        cache.check()
        assert_kv_intact(cache)
        stats = cache.stats()
        assert stats["live_tokens"] == self.expected_live_tokens()
        assert stats["used_chunks"] + stats["cached_chunks"] + stats["free_chunks"] == stats["total_chunks"]
        assert stats["kv_bytes"] == (stats["used_chunks"] + stats["cached_chunks"]) * cache.chunk_bytes
        if not cache.sequences and not cache.retain_prefixes:
            assert stats["free_chunks"] == stats["total_chunks"], "chunks leaked"

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for seq in self.cache.sequences:
            self.cache.release(seq)
        self.cache.evict_all()
        stats = self.cache.stats()
        assert stats["free_chunks"] == stats["total_chunks"] and stats["live_tokens"] == 0, "chunks leaked"
        assert self.cache.tree.num_roots == 0, "a namespace or private root outlived its chunks and users"
        self.cache.check()


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase
