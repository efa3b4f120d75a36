"""Attention backends against the float64 reference, one parametrize per dimension, odd sizes included."""

from __future__ import annotations

import random

import pytest
import torch

import chunkattn
from chunkattn import PrefixKVCache
from helpers import REL_TOL, check_attention, rel_err


def random_store(cache: PrefixKVCache, batch: chunkattn.Batch) -> None:
    n = batch.num_new_tokens
    for layer in range(cache.num_layers):
        k = torch.randn(n, cache.num_kv_heads, cache.head_dim).to(cache.device, cache.dtype)
        v = torch.randn(n, cache.num_kv_heads, cache.head_dim).to(cache.device, cache.dtype)
        cache.store(layer, batch, k, v)


def shared_prompt_batch(
    *, batch: int, shared: int, private: int, chunk_size: int, head_dim: int, kv_heads: int,
    dtype: torch.dtype, decode: bool, max_tokens: int | None = None, device: str = "cpu",
) -> tuple[PrefixKVCache, chunkattn.Batch]:
    """``batch`` sequences: one ``shared``-token prompt, then ``private`` own tokens each (varied per sequence).

    decode=True: the prompts are prefilled, then one decode step is returned.
    decode=False: the first sequence is prefilled alone, the rest in one mixed prefill batch (their shared
    part cached), which is returned.
    """
    rng = random.Random(torch.initial_seed())
    prefix = [rng.randrange(1000) for _ in range(shared)]
    prompts = [prefix + [rng.randrange(1000) for _ in range(max(1, private - i % 3))] for i in range(batch)]
    total = sum(len(p) for p in prompts) + 2 * batch * chunk_size
    cache = PrefixKVCache(1, kv_heads, head_dim, chunk_size=chunk_size, max_tokens=max_tokens or total * 2,
                          dtype=dtype, device=device)
    first = cache.add_sequence(prompts[0])
    random_store(cache, cache.extend([first], [prompts[0]]))
    seqs = [first] + [cache.add_sequence(p) for p in prompts[1:]]
    if len(seqs) > 1:
        prefill = cache.extend(seqs[1:], [p[s.num_cached_tokens :] for s, p in zip(seqs[1:], prompts[1:])])
        random_store(cache, prefill)
        if not decode:
            return cache, prefill
    step = cache.extend(seqs, [[rng.randrange(1000)] for _ in seqs])
    random_store(cache, step)
    return cache, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("decode", [True, False])
def test_torch_matches_reference_dtypes_and_head_dims(dtype, head_dim, group, decode):
    cache, batch = shared_prompt_batch(batch=5, shared=37, private=9, chunk_size=16, head_dim=head_dim,
                                       kv_heads=2, dtype=dtype, decode=decode)
    check_attention(cache, batch, 2 * group, "torch")


@pytest.mark.parametrize("batch_size", [1, 2, 17])
@pytest.mark.parametrize("shared", [0, 1, 16, 97])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_torch_matches_reference_shapes(batch_size, shared, chunk_size):
    cache, batch = shared_prompt_batch(batch=batch_size, shared=shared, private=5, chunk_size=chunk_size,
                                       head_dim=16, kv_heads=3, dtype=torch.float32, decode=True)
    check_attention(cache, batch, 6, "torch")
    plan = cache.plan(batch)
    if batch_size >= 2 and shared >= chunk_size:
        assert plan.num_shared > 0


@pytest.mark.parametrize("kv_heads,q_heads", [(1, 8), (4, 4), (2, 6)])
def test_gqa_and_mqa_match_reference(kv_heads, q_heads):
    cache, batch = shared_prompt_batch(batch=4, shared=20, private=7, chunk_size=8, head_dim=32,
                                       kv_heads=kv_heads, dtype=torch.float32, decode=True)
    check_attention(cache, batch, q_heads, "torch")


def test_custom_scale_and_lse_base_e():
    cache, batch = shared_prompt_batch(batch=3, shared=10, private=4, chunk_size=4, head_dim=8, kv_heads=1,
                                       dtype=torch.float32, decode=True)
    check_attention(cache, batch, 2, "torch", scale=0.3)
    # base e: with all-zero keys every score is 0, so lse = ln(number of keys)
    cache.k_cache.zero_()
    q = torch.randn(batch.num_new_tokens, 2, 8)
    _, lse = chunkattn.attention(q, cache, batch, 0, backend="torch", return_lse=True)
    expected = torch.tensor([float(n) for n in batch.seq_lens]).log()[:, None].expand_as(lse)
    assert torch.allclose(lse, expected, atol=1e-5)


def test_reference_matches_plain_softmax_attention():
    """The oracle itself against torch's SDPA on one dense sequence."""
    cache = PrefixKVCache(1, 2, 16, chunk_size=4, max_tokens=64, dtype=torch.float32)
    seq = cache.add_sequence(list(range(11)))
    batch = cache.extend([seq], [list(range(11))])
    random_store(cache, batch)
    q = torch.randn(11, 2, 16)
    out = chunkattn.attention(q, cache, batch, 0, backend="reference")
    rows = cache.sequence_kv_rows(seq)
    k, v = cache.k_cache[0][rows], cache.v_cache[0][rows]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    assert rel_err(out, sdpa) < REL_TOL[torch.float32]
