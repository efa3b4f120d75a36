"""PrefixKVCache: sharing edge cases, accounting, eviction, errors. Attention via the torch backend."""

from __future__ import annotations

import pytest
import torch

from chunkattn import CacheFullError, PrefixKVCache, SequenceError
from helpers import assert_kv_intact, check_attention, store_prefix_kv, trie_size


def make_cache(chunk_size: int = 4, max_tokens: int = 256, retain: bool = True, layers: int = 2,
               dtype: torch.dtype = torch.float32) -> PrefixKVCache:
    return PrefixKVCache(layers, 2, 8, chunk_size=chunk_size, max_tokens=max_tokens, dtype=dtype,
                         retain_prefixes=retain)


def add_prompt(cache: PrefixKVCache, prompt: list[int]):
    """add_sequence + extend with the rest + store; returns (seq, batch)."""
    seq = cache.add_sequence(prompt)
    batch = cache.extend([seq], [prompt[seq.num_cached_tokens :]])
    store_prefix_kv(cache, batch)
    return seq, batch


def decode(cache: PrefixKVCache, seqs, tokens, heads: int = 4):
    batch = cache.extend(seqs, [[t] for t in tokens])
    store_prefix_kv(cache, batch)
    check_attention(cache, batch, heads, "torch")
    return batch


def live_token_lists(cache: PrefixKVCache) -> list[list[int]]:
    return [list(s.token_ids) for s in cache.sequences]


def assert_consistent(cache: PrefixKVCache) -> None:
    cache.check()
    assert_kv_intact(cache)
    assert cache.stats()["live_tokens"] == trie_size(live_token_lists(cache))


# ---------------------------------------------------------------------------- sharing edge cases
def test_prefix_ending_on_chunk_boundary_shares_whole_chunks_without_split():
    cache = make_cache(chunk_size=4)
    shared = [1, 2, 3, 4, 5, 6, 7, 8]
    a, _ = add_prompt(cache, shared + [10, 11])
    version = cache.tree.version
    b, _ = add_prompt(cache, shared + [20])
    assert b.num_cached_tokens == 8
    assert cache.tree.version > version  # a new chunk for b's own token ...
    path_a, path_b = a._end.path(), b._end.path()
    assert [n.id for n in path_a[:2]] == [n.id for n in path_b[:2]]
    assert all(len(n) == 4 for n in path_b[:2])  # ... but no split of the shared ones
    assert_consistent(cache)
    batch = decode(cache, [a, b], [30, 31])
    assert cache.plan(batch).num_shared == 2


def test_prefix_diverging_inside_a_chunk_is_split_and_shared_to_the_token():
    cache = make_cache(chunk_size=4)
    a, _ = add_prompt(cache, [1, 2, 3, 4, 5, 6])
    b, _ = add_prompt(cache, [1, 2, 3, 4, 5, 9])
    assert b.num_cached_tokens == 5
    assert cache.stats()["live_tokens"] == 7
    assert_consistent(cache)
    batch = decode(cache, [a, b], [7, 7])
    assert sum(cache.plan(batch).shared_len) == 5


def test_one_sequence_a_prefix_of_another():
    cache = make_cache(chunk_size=4)
    long = [5, 6, 7, 8, 9, 10, 11]
    a, _ = add_prompt(cache, long)
    b = cache.add_sequence(long[:5])
    assert b.num_cached_tokens == 4  # capped at len - 1
    batch = cache.extend([b], [long[4:5]])
    assert batch.store_rows.numel() == 0  # its last token's K/V is already there
    store_prefix_kv(cache, batch)
    check_attention(cache, batch, 4, "torch")
    assert cache.stats()["live_tokens"] == len(long)
    assert_consistent(cache)
    decode(cache, [a, b], [1, 2])
    assert_consistent(cache)


def test_identical_sequences_share_everything_even_within_one_batch():
    cache = make_cache(chunk_size=4)
    prompt = list(range(10))
    a, b = cache.add_sequence(prompt), cache.add_sequence(prompt)
    batch = cache.extend([a, b], [prompt, prompt])
    assert batch.store_rows.tolist() == list(range(10))  # b's rows are a's
    store_prefix_kv(cache, batch)
    check_attention(cache, batch, 4, "torch")
    assert cache.stats()["live_tokens"] == 10
    c, _ = add_prompt(cache, prompt)
    assert c.num_cached_tokens == 9 and cache.stats()["live_tokens"] == 10
    assert_consistent(cache)
    batch = decode(cache, [a, b, c], [1, 1, 2])
    assert cache.stats()["live_tokens"] == 12
    assert_consistent(cache)


def test_divergence_at_the_first_token_shares_nothing():
    cache = make_cache(chunk_size=4)
    a, _ = add_prompt(cache, [1, 2, 3, 4, 5])
    b, _ = add_prompt(cache, [2, 2, 3, 4, 5])
    assert b.num_cached_tokens == 0
    batch = decode(cache, [a, b], [0, 0])
    assert cache.plan(batch).num_shared == 0
    assert cache.stats()["live_tokens"] == 12
    assert_consistent(cache)


@pytest.mark.parametrize("chunk_size", [1, 256])
def test_extreme_chunk_sizes(chunk_size: int):
    cache = make_cache(chunk_size=chunk_size, max_tokens=1024)
    base = list(range(40))
    seqs = [add_prompt(cache, base + [100 + i, 200 + i])[0] for i in range(3)]
    assert [s.num_cached_tokens for s in seqs] == [0, 40, 40]
    for step in range(3):
        batch = decode(cache, seqs, [step, step + 1, step])
    plan = cache.plan(batch)
    assert sum(plan.shared_len) == 40
    assert_consistent(cache)


def test_no_shared_prefix_batch_runs_sequence_first_only():
    cache = make_cache(chunk_size=4)
    seqs = [add_prompt(cache, [10 * i + j for j in range(1, 7)])[0] for i in range(1, 4)]
    batch = decode(cache, seqs, [1, 2, 3])
    assert cache.plan(batch).num_shared == 0


def test_fork_shares_the_partial_tail_and_diverges_without_copying():
    cache = make_cache(chunk_size=4)
    a, _ = add_prompt(cache, [1, 2, 3, 4, 5, 6])  # tail chunk holds 2 of 4 tokens
    f = cache.fork(a)
    assert f.token_ids == a.token_ids and cache.stats()["live_tokens"] == 6
    held = cache.stats()["used_chunks"]
    decode(cache, [a, f], [7, 8])
    assert cache.stats()["used_chunks"] == held + 1  # one of them used the tail's room, the other a new chunk
    decode(cache, [a, f], [9, 9])
    assert_consistent(cache)


def test_decode_grows_the_tail_in_place_and_plan_only_advances():
    cache = make_cache(chunk_size=8)
    prompt = list(range(20))
    seqs = [add_prompt(cache, prompt + [50 + i])[0] for i in range(3)]
    plan = cache.plan(decode(cache, seqs, [1, 2, 3]))
    builds_before = plan.num_advances
    batch = decode(cache, seqs, [4, 5, 6])
    assert cache.plan(batch) is plan and plan.num_advances == builds_before + 1
    # keep decoding until a tail chunk fills: the structure changes and the plan is rebuilt
    for t in range(8):
        batch = decode(cache, seqs, [t, t, t])
    assert cache.plan(batch) is not plan


# ---------------------------------------------------------------------------- retention and eviction
def test_released_prefix_is_retained_and_reused():
    cache = make_cache(chunk_size=4)
    a, _ = add_prompt(cache, list(range(12)))
    cache.release(a)
    stats = cache.stats()
    assert stats["used_chunks"] == 0 and stats["cached_chunks"] == 3 and stats["cached_tokens"] == 12
    b, _ = add_prompt(cache, list(range(12)) + [99])
    assert b.num_cached_tokens == 12
    assert_consistent(cache)


def test_retention_off_frees_at_once_and_nothing_leaks():
    cache = make_cache(chunk_size=4, retain=False)
    seqs = [add_prompt(cache, list(range(9)) + [i])[0] for i in range(3)]
    forks = [cache.fork(s) for s in seqs]
    decode(cache, seqs + forks, [1, 2, 3, 4, 5, 6])
    for s in seqs + forks:
        cache.release(s)
        cache.check()
    stats = cache.stats()
    assert stats["free_chunks"] == stats["total_chunks"] and stats["kv_bytes"] == 0
    assert cache.add_sequence(list(range(9)) + [0]).num_cached_tokens == 0


def test_lru_evicts_least_recently_used_leaves_first():
    cache = make_cache(chunk_size=4, max_tokens=16)  # 4 chunks
    old, _ = add_prompt(cache, [1, 1, 1, 1])
    new, _ = add_prompt(cache, [2, 2, 2, 2])
    cache.release(old)
    cache.release(new)
    c, _ = add_prompt(cache, [3] * 12)  # needs 3 chunks: 2 free, evict 1: the older one
    assert cache.match_prefix([1, 1, 1, 1]) == 0
    assert cache.match_prefix([2, 2, 2, 2]) == 4
    assert_consistent(cache)


def test_cache_full_is_typed_and_atomic():
    cache = make_cache(chunk_size=4, max_tokens=16)
    a, _ = add_prompt(cache, list(range(10)))
    b = cache.add_sequence([7, 7])
    snapshot = (cache.stats(), cache.tree.version, a.token_ids, b.token_ids, cache.k_cache.clone())
    with pytest.raises(CacheFullError):
        cache.extend([b, a], [[7, 7, 7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert snapshot[:4] == (cache.stats(), cache.tree.version, a.token_ids, b.token_ids)
    assert torch.equal(snapshot[4], cache.k_cache)
    cache.check()
    batch = cache.extend([b], [[7, 7, 7, 7]])  # what fits still works
    store_prefix_kv(cache, batch)
    assert_consistent(cache)


def test_eviction_never_touches_live_chunks():
    cache = make_cache(chunk_size=2, max_tokens=24)
    live, _ = add_prompt(cache, [9] * 7)
    for i in range(6):
        s, _ = add_prompt(cache, [i, i, i, i])
        cache.release(s)
        assert_consistent(cache)
    assert live.token_ids == (9,) * 7


def test_lru_prefers_a_prefix_read_again_over_an_older_one():
    cache = make_cache(chunk_size=4, max_tokens=16)
    first, _ = add_prompt(cache, [1, 1, 1, 1])
    second, _ = add_prompt(cache, [2, 2, 2, 2])
    cache.release(first)
    cache.release(second)
    again = cache.add_sequence([1, 1, 1, 1, 5])  # reads the first prefix again: now the most recent
    cache.release(again)
    add_prompt(cache, [3] * 12)
    assert cache.match_prefix([1, 1, 1, 1]) == 4 and cache.match_prefix([2, 2, 2, 2]) == 0
    assert_consistent(cache)


def test_longest_first_policy_keeps_short_common_prefixes():
    for policy, kept in (("lru", [[5] * 4 + [6] * 8]), ("longest-first", [[1] * 4])):
        cache = PrefixKVCache(1, 2, 8, chunk_size=4, max_tokens=24, dtype=torch.float32, eviction=policy)
        short, _ = add_prompt(cache, [1] * 4)
        long, _ = add_prompt(cache, [5] * 4 + [6] * 8)
        cache.release(short)
        cache.release(long)  # the long prefix is the most recent
        add_prompt(cache, [9] * 12)  # 3 of the 6 chunks: one prefix must go
        for tokens in kept:
            assert cache.match_prefix(tokens) == len(tokens), policy
        cache.check()


def test_a_custom_eviction_policy_is_one_class():
    from chunkattn.cache.eviction import EvictionPolicy

    class EvictTokenSevenFirst(EvictionPolicy):
        def priority(self, node):
            return (0 if 7 in node.tokens else 1, node.last_access)

    cache = PrefixKVCache(1, 2, 8, chunk_size=4, max_tokens=16, dtype=torch.float32,
                          eviction=EvictTokenSevenFirst())
    for tokens in ([7] * 4, [8] * 4):
        s, _ = add_prompt(cache, tokens)
        cache.release(s)
    add_prompt(cache, [9] * 12)
    assert cache.match_prefix([7] * 4) == 0 and cache.match_prefix([8] * 4) == 4
    with pytest.raises(ValueError, match="eviction policy"):
        PrefixKVCache(1, 2, 8, eviction="fifo")


def test_pinned_prefix_survives_pressure_until_unpinned():
    cache = make_cache(chunk_size=4, max_tokens=24)  # 6 chunks
    system = list(range(10))
    s, _ = add_prompt(cache, system + [50])
    cache.release(s)
    pin = cache.pin(system + [77, 78])  # only the cached part is pinned, split exactly at its end
    assert pin.num_tokens == 10 and pin.token_ids == tuple(system)
    cache.check()
    assert cache.num_live_chunks == 3 and cache.num_evictable_chunks == 0  # the [50] tail shares a pinned slot
    for i in range(5):
        t, _ = add_prompt(cache, [100 + i] * 8)
        cache.release(t)
        assert cache.match_prefix(system) == 10
    assert cache.evict_all() >= 1 and cache.match_prefix(system) == 10
    with pytest.raises(CacheFullError):
        add_prompt(cache, [200] * 16)  # 4 chunks: only 3 can be had while the pin holds 3
    cache.unpin(pin)
    with pytest.raises(ValueError, match="already"):
        cache.unpin(pin)
    add_prompt(cache, [200] * 16)
    assert cache.match_prefix(system) < 10
    assert_consistent(cache)
    with pytest.raises(ValueError, match="share_prefixes"):
        PrefixKVCache(1, 2, 8, share_prefixes=False).pin([1, 2])


def test_capacity_methods_answer_what_the_scheduler_asks():
    cache = make_cache(chunk_size=4, max_tokens=32)  # 8 chunks
    a, _ = add_prompt(cache, list(range(10)))
    assert cache.num_live_chunks == 3 and cache.num_free_chunks == 5 and cache.num_evictable_chunks == 0
    assert cache.chunks_to_add(list(range(10)) + [1, 2, 3]) == 2  # 3 new tokens after a split: <= 2 chunks
    assert cache.chunks_to_add([99] * 9) == 4
    assert cache.can_allocate(5) and not cache.can_allocate(6)
    cache.release(a)
    assert cache.num_evictable_chunks == 3 and cache.can_allocate(8)
    # a prompt continuing the retained one takes its 3 chunks out of the evictable ones, and up to 2 new ones
    m = cache.lookup(list(range(10)) + [1, 2, 3])
    assert m.chunks_needed == 2 and cache.room_needed([m]) == 5 and cache.room_needed([m, m]) == 7
    assert cache.room_needed([cache.lookup([99] * 9)]) == 4  # nothing cached: only new chunks
    add_prompt(cache, [50, 51])
    with pytest.raises(ValueError, match="current"):
        cache.room_needed([m])


def test_a_pool_that_cannot_fit_the_available_memory_is_refused_before_it_is_allocated():
    from chunkattn import InsufficientMemoryError
    from chunkattn.utils import MEMORY_FRACTION, available_memory

    with pytest.raises(InsufficientMemoryError, match=r"a K/V pool of 1099511627776 tokens needs 32768.0 GiB "
                       r"\(32 bytes a token: 1 layers x 1 K/V heads x head dim 8 x K and V x 2 bytes\)") as info:
        PrefixKVCache(1, 1, 8, max_tokens=2**40, dtype=torch.bfloat16)
    assert isinstance(info.value, MemoryError)
    fit = int(str(info.value).rsplit("at most ", 1)[1].split()[0])
    available = available_memory(torch.device("cpu"))
    # (MemAvailable moves a little between the two reads)
    assert available is not None and abs(fit * 32 - MEMORY_FRACTION * available) < 0.05 * available
    assert fit % 64 == 0  # whole chunks (64 tokens by default)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_room_needed_bounds_what_adding_and_computing_a_prompt_takes(seed):
    """On random trees (shared prefixes, live and retained chunks, splits, evictions): starting a sequence from a
    lookup and computing its prompt never takes more free-or-evictable room than ``room_needed`` said."""
    g = torch.Generator().manual_seed(seed)
    cache = make_cache(chunk_size=4, max_tokens=96)
    base = torch.randint(0, 5, (40,), generator=g).tolist()
    live = []
    for _ in range(120):
        cut = int(torch.randint(1, len(base) + 1, (1,), generator=g))
        prompt = base[:cut] + torch.randint(0, 5, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        m = cache.lookup(prompt)
        need = cache.room_needed([m])
        room = cache.num_free_chunks + cache.num_evictable_chunks
        if not cache.can_allocate(need):
            if live:
                cache.release(live.pop(0))
            continue
        seq = cache.add_sequence(prompt, match=m)
        store_prefix_kv(cache, cache.extend([seq], [prompt[seq.num_cached_tokens :]]))
        assert room - (cache.num_free_chunks + cache.num_evictable_chunks) <= need
        live.append(seq)
        if len(live) > 3 or int(torch.randint(0, 3, (1,), generator=g)) == 0:
            cache.release(live.pop(int(torch.randint(0, len(live), (1,), generator=g))))
        cache.check()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_add_sequence_from_a_lookup_equals_walking_the_tree_again(seed):
    """lookup() + add_sequence(match=) starts the same sequence as add_sequence() alone, on random trees: whole
    prompts cached (the last token backs off, also across a chunk boundary), partial matches, namespaces,
    prompt logprobs (no reuse), and matches made stale by a change of the tree in between."""
    g = torch.Generator().manual_seed(seed)
    twins = [make_cache(chunk_size=4, max_tokens=512), make_cache(chunk_size=4, max_tokens=512)]
    base = torch.randint(0, 6, (24,), generator=g).tolist()
    for step in range(40):
        cut = int(torch.randint(1, len(base) + 1, (1,), generator=g))
        prompt = base[:cut] + torch.randint(0, 6, (int(torch.randint(0, 5, (1,), generator=g)),), generator=g).tolist()
        ns = None if step % 5 else "tenant"
        reuse = step % 7 != 3
        # (checked=True: the caller vouches for the ids, as the scheduler does; a tuple works the same)
        m = twins[0].lookup(tuple(prompt) if step % 3 == 2 else prompt, ns, checked=step % 2 == 0)
        assert m.num_cached_tokens == twins[1].match_prefix(prompt, ns)
        assert m.chunks_needed == twins[1].chunks_to_add(prompt, ns)
        assert twins[0].is_current(m) and not twins[1].is_current(m)
        if step % 4 == 1:  # the tree changes between the lookup and the add: the match is stale
            add_prompt(twins[0], [7, 7, step])
            add_prompt(twins[1], [7, 7, step])
            assert not twins[0].is_current(m)
        a = twins[0].add_sequence(m.token_ids if step % 2 else prompt, reuse_prefix=reuse, namespace=ns, match=m)
        b = twins[1].add_sequence(prompt, reuse_prefix=reuse, namespace=ns)
        assert a.num_cached_tokens == b.num_cached_tokens <= len(prompt) - 1
        assert a.token_ids == b.token_ids == tuple(prompt[: a.num_cached_tokens])
        if reuse:  # what the match says the prompt will compute is what its sequence is extended by
            assert m.num_new_tokens == len(prompt) - a.num_cached_tokens >= 1
        for cache, seq in zip(twins, (a, b)):
            batch = cache.extend([seq], [prompt[seq.num_cached_tokens :]])
            store_prefix_kv(cache, batch)
            if step % 3 == 0:
                cache.release(seq)
            cache.check()  # (not assert_consistent: its token count assumes one namespace)
            assert_kv_intact(cache)
        assert twins[0].stats() == twins[1].stats()


def test_a_lookup_is_only_used_for_its_own_tokens_cache_and_namespace():
    cache, other = make_cache(), make_cache()
    m = cache.lookup([1, 2, 3])
    for bad in (lambda: cache.add_sequence([1, 2, 4], match=m), lambda: cache.add_sequence([1, 2, 3], match=m,
                namespace="x"), lambda: other.add_sequence([1, 2, 3], match=m)):
        with pytest.raises(ValueError, match="lookup"):
            bad()


# ---------------------------------------------------------------------------- errors
def test_bad_input_raises_clear_errors():
    cache = make_cache()
    other = make_cache()
    with pytest.raises(ValueError, match="empty"):
        cache.add_sequence([])
    with pytest.raises(TypeError, match="int token ids"):
        cache.add_sequence([1, 2.5])
    with pytest.raises(TypeError, match="int token ids"):
        cache.add_sequence([True, 2])
    with pytest.raises(TypeError):
        cache.add_sequence("hello")
    with pytest.raises(ValueError, match="negative"):
        cache.add_sequence([1, -2])
    with pytest.raises(TypeError):
        cache.add_sequence(torch.tensor([1.0, 2.0]))
    assert cache.add_sequence(torch.tensor([1, 2])).num_tokens == 0
    seq = cache.add_sequence([1, 2, 3])
    with pytest.raises(ValueError, match="2 token lists"):
        cache.extend([seq], [[1], [2]])
    with pytest.raises(ValueError, match="twice"):
        cache.extend([seq, seq], [[1], [2]])
    with pytest.raises(SequenceError, match="another"):
        other.extend([seq], [[1]])
    batch = cache.extend([seq], [[1, 2, 3]])
    k = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"num_new_tokens, num_kv_heads, head_dim\] = \[3, 2, 8\]"):
        cache.store(0, batch, k[:2], k[:2])
    with pytest.raises(TypeError, match="float32"):
        cache.store(0, batch, k.half(), k.half())
    with pytest.raises(IndexError, match="layer"):
        cache.store(5, batch, k, k)
    cache.store(0, batch, k, k)
    q = torch.zeros(3, 4, 8)
    from chunkattn import attention

    with pytest.raises(ValueError, match="multiple"):
        attention(torch.zeros(3, 3, 8), cache, batch, 0)
    with pytest.raises(ValueError, match="backend"):
        attention(q, cache, batch, 0, backend="cuda")  # type: ignore[arg-type]
    cache.extend([seq], [[4]])
    with pytest.raises(ValueError, match="newest batch"):
        attention(q, cache, batch, 0)
    cache.release(seq)
    with pytest.raises(SequenceError, match="released"):
        cache.release(seq)
    with pytest.raises(SequenceError, match="released"):
        cache.fork(seq)
    with pytest.raises(ValueError):
        PrefixKVCache(0, 2, 8)
    with pytest.raises(TypeError):
        PrefixKVCache(1, 2, 8, dtype=torch.int32)


def test_check_batch_is_memoized_until_a_sequence_grows_or_is_released():
    """check_batch remembers a batch it passed until some live sequence grows or is released: another
    sequence's growth keeps the batch valid (rechecked), a release or growth of its own invalidates it."""
    cache = PrefixKVCache(1, 2, 8, chunk_size=4, max_tokens=256, dtype=torch.float32)
    a, b = cache.add_sequence([1, 2, 3]), cache.add_sequence([1, 2, 5])
    batch = cache.extend([a, b], [[1, 2, 3], [1, 2, 5]])
    checks = []
    check_seq = cache._check_seq
    cache._check_seq = lambda seq: checks.append(seq) or check_seq(seq)  # type: ignore[method-assign]
    cache.check_batch(batch)
    assert len(checks) == 2
    cache.check_batch(batch)
    assert len(checks) == 2  # memoized: nothing changed
    c = cache.add_sequence([9])
    cache.extend([c], [[9]])
    n = len(checks)
    cache.check_batch(batch)  # rechecked: a and b did not change
    assert len(checks) == n + 2
    cache.release(b)
    with pytest.raises(SequenceError, match="released"):
        cache.check_batch(batch)
    batch = cache.extend([a], [[4]])
    cache.check_batch(batch)
    cache.extend([a], [[5]])
    with pytest.raises(ValueError, match="newest batch"):
        cache.check_batch(batch)


def test_prefix_sharing_off_keeps_every_sequence_apart():
    cache = PrefixKVCache(2, 2, 8, chunk_size=4, max_tokens=256, dtype=torch.float32, share_prefixes=False)
    prompt = list(range(10))
    a, _ = add_prompt(cache, prompt)
    b, _ = add_prompt(cache, prompt)
    assert b.num_cached_tokens == 0 and cache.match_prefix(prompt) == 0
    assert cache.stats()["live_tokens"] == 20 and cache.stats()["shared_chunks"] == 0
    batch = decode(cache, [a, b], [1, 1])
    assert cache.plan(batch).num_shared == 0
    f = cache.fork(a)  # forks still share with their parent
    assert cache.stats()["live_tokens"] == 22
    for s in (a, b, f):
        cache.release(s)
    assert cache.stats()["free_chunks"] == cache.stats()["total_chunks"]  # nothing retained
    cache.check()


def test_sharing_off_fork_of_an_empty_sequence_keeps_its_root():
    """Regression (found by the state machine): releasing a fork must not drop a root its parent still uses."""
    cache = PrefixKVCache(1, 2, 8, chunk_size=1, max_tokens=3, dtype=torch.float32, share_prefixes=False)
    a = cache.add_sequence([0, 0])
    f = cache.fork(a)
    cache.release(f)
    batch = cache.extend([a], [[0, 0]])
    store_prefix_kv(cache, batch)
    assert_consistent(cache)


def test_namespaces_never_share_and_their_roots_go_when_empty():
    cache = PrefixKVCache(1, 1, 8, chunk_size=4, max_tokens=64, dtype=torch.float32)
    prompt = list(range(10))

    def run(namespace):
        seq = cache.add_sequence(prompt, namespace=namespace)
        store_prefix_kv(cache, cache.extend([seq], [prompt[seq.num_cached_tokens:]]))
        cache.check()
        return seq

    a = run("alice")
    assert a.num_cached_tokens == 0 and cache.match_prefix(prompt, "alice") == 10
    assert cache.match_prefix(prompt) == 0 and cache.match_prefix(prompt, "bob") == 0
    b = run("bob")
    assert b.num_cached_tokens == 0  # same tokens, another tenant: nothing shared
    a2 = run("alice")
    assert a2.num_cached_tokens == 9  # the same tenant shares
    common = run(None)
    assert common.num_cached_tokens == 0
    assert cache.stats()["shared_chunks"] > 0 and cache.stats()["saved_tokens"] >= 9
    assert_kv_intact(cache)
    pin = cache.pin(prompt, namespace="bob")
    assert pin.num_tokens == 10
    for seq in (a, b, a2, common):
        cache.release(seq)
    cache.check()
    assert cache.evict_all() > 0
    cache.check()
    assert cache.tree.num_roots == 1  # only bob's root stays: its pin holds it
    assert cache.match_prefix(prompt, "bob") == 10 and cache.match_prefix(prompt, "alice") == 0
    cache.unpin(pin)
    cache.evict_all()
    cache.check()
    assert cache.tree.num_roots == 0 and cache.num_free_chunks == cache.num_slots
    with pytest.raises(TypeError):
        cache.add_sequence(prompt, namespace=3)  # type: ignore[arg-type]
