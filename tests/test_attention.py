"""Attention backends against the float64 reference, one parametrize per dimension, odd sizes included."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from types import ModuleType
from typing import Any

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


def cpu_workspace(cache: PrefixKVCache, batch: chunkattn.Batch, q_heads: int, kv_heads: int, head_dim: int,
                  **kwargs: Any) -> Any:
    """The native CPU backend's task lists for ``batch`` (threads=2 unless given)."""
    from chunkattn.attention import get_backend

    backend = get_backend("cpu", cache)
    backend.plan(batch)
    return cpu_tpp().CpuWorkspace.build(backend.attention_plan, q_heads, kv_heads, head_dim,
                                        **{"threads": 2, **kwargs})


def cpu_tpp() -> ModuleType:
    """The module (``import chunkattn.attention.cpu_tpp as m`` finds ``chunkattn.attention``, the function)."""
    import importlib

    return importlib.import_module("chunkattn.attention.cpu_tpp")


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


CPU_BACKENDS = ["torch", "cpu"]  # the vectorized-PyTorch path and the native kernels


def supports(backend: str, dtype: torch.dtype) -> bool:
    return backend != "cpu" or dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("decode", [True, False])
def test_backends_match_reference_dtypes_and_head_dims(backend, dtype, head_dim, group, decode):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} has no {dtype} path (tested to refuse it below)")
    cache, batch = shared_prompt_batch(batch=5, shared=37, private=9, chunk_size=16, head_dim=head_dim,
                                       kv_heads=2, dtype=dtype, decode=decode)
    check_attention(cache, batch, 2 * group, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 2, 17])
@pytest.mark.parametrize("shared", [0, 1, 16, 97])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_backends_match_reference_shapes(backend, batch_size, shared, chunk_size):
    cache, batch = shared_prompt_batch(batch=batch_size, shared=shared, private=5, chunk_size=chunk_size,
                                       head_dim=16, kv_heads=3, dtype=torch.float32, decode=True)
    check_attention(cache, batch, 6, backend)
    plan = cache.plan(batch)
    if batch_size >= 2 and shared >= chunk_size:
        assert plan.num_shared > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kv_heads,q_heads", [(1, 8), (4, 4), (2, 6), (3, 9)])
def test_gqa_and_mqa_match_reference(backend, kv_heads, q_heads):
    cache, batch = shared_prompt_batch(batch=4, shared=20, private=7, chunk_size=8, head_dim=32,
                                       kv_heads=kv_heads, dtype=torch.float32, decode=True)
    check_attention(cache, batch, q_heads, backend)


@pytest.mark.parametrize("head_dim", [8, 24, 48, 80])
@pytest.mark.parametrize("decode", [True, False])
def test_cpu_kernel_odd_head_dims(head_dim, decode):
    cache, batch = shared_prompt_batch(batch=3, shared=21, private=6, chunk_size=8, head_dim=head_dim,
                                       kv_heads=2, dtype=torch.float32, decode=decode)
    check_attention(cache, batch, 6, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size,shared,private,batch_size", [
    (256, 700, 90, 3),  # chunks longer than one key block of the kernel
    (64, 1030, 140, 40),  # many sharing rows: several row tiles and shared pieces
    (16, 0, 300, 2),  # long private prefill: many row tiles, causal masks inside blocks
    (64, 300, 1, 1),  # one sequence: nothing shared, written directly
    (16, 0, 1500, 1),  # one long sequence: its decode token's keys split over several tasks, merged
    (32, 8, 700, 3),  # long private parts beside a short shared one
])
@pytest.mark.parametrize("decode", [True, False])
def test_cpu_kernel_long_and_wide_batches(dtype, chunk_size, shared, private, batch_size, decode):
    cache, batch = shared_prompt_batch(batch=batch_size, shared=shared, private=private, chunk_size=chunk_size,
                                       head_dim=64, kv_heads=3, dtype=dtype, decode=decode)
    check_attention(cache, batch, 9, "cpu")


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("q_heads", [3, 13])
def test_cpu_kernel_bf16_prefill_score_tiles_and_masked_softmax(head_dim, q_heads):
    """bfloat16 prefill by dot products (AMX off where present): score tiles with the head size fixed at compile
    time (64, 128) or not (32, 96), row counts that leave every tail of a tile (3 and 13 query rows per token),
    rows that see any number of a diagonal block's keys (the softmax's masked lanes), several key blocks."""
    cache, batch = shared_prompt_batch(batch=2, shared=45, private=171, chunk_size=16, head_dim=head_dim,
                                       kv_heads=1, dtype=torch.bfloat16, decode=False)
    from chunkattn import native

    ops = torch.ops.chunkattn_cpu if native.available() else None
    was = ops.set_amx(False) if ops is not None else None
    try:
        check_attention(cache, batch, q_heads, "cpu")
    finally:
        if ops is not None:
            ops.set_amx(was)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,kv_heads,q_heads", [(128, 4, 4), (128, 2, 6), (64, 5, 5), (64, 3, 6),
                                                       (96, 3, 3), (64, 2, 8), (128, 2, 8)])
def test_cpu_kernel_wide_decode_over_many_key_blocks(dtype, head_dim, kv_heads, q_heads):
    """Decode tokens with small GQA groups run "wide" tasks (every head at once, in blocks of keys): many
    blocks, a partial last one, chunks not a multiple of the block, and head sizes with and without a fixed path."""
    cache, batch = shared_prompt_batch(batch=3, shared=5, private=203, chunk_size=24, head_dim=head_dim,
                                       kv_heads=kv_heads, dtype=dtype, decode=True)
    check_attention(cache, batch, q_heads, "cpu")
    ws = cpu_workspace(cache, batch, q_heads, kv_heads, head_dim)
    group = q_heads // kv_heads
    assert (ws.num_wide_tasks > 0) == (group <= 3 or (group == 4 and head_dim == 64)), ws


def test_cpu_plan_sends_every_decode_group_up_to_16_wide_on_amx():
    """bf16 on AMX tiles: a decode token with private keys gets wide tasks for any GQA group the AMX wide task
    takes (up to 16 query heads per K/V head); larger groups, and prefill tokens, keep per-head tasks."""
    for q_heads, kv_heads, head_dim, decode, wide in [(32, 8, 128, True, True), (64, 4, 128, True, True),
                                                      (32, 1, 64, True, False), (32, 8, 128, False, False)]:
        cache, batch = shared_prompt_batch(batch=3, shared=40, private=30, chunk_size=16, head_dim=head_dim,
                                           kv_heads=kv_heads, dtype=torch.bfloat16, decode=decode)
        on = cpu_workspace(cache, batch, q_heads, kv_heads, head_dim, amx=True)
        off = cpu_workspace(cache, batch, q_heads, kv_heads, head_dim, amx=False)
        assert (on.num_wide_tasks > 0) == wide, (q_heads, kv_heads, decode, on)
        assert off.num_wide_tasks == 0, off  # groups of 4 at d = 128 and larger stay per head without AMX


def test_cpu_plan_takes_bigger_row_tiles_on_amx_while_every_thread_has_work():
    """bf16 on AMX: tasks of up to ROWS_PER_TASK_AMX query rows, halved while fewer than 2 tasks per thread."""
    for tokens, amx, want_tiles in [(2048, True, 2048 * 3 // 384), (2048, False, 2048 * 3 // 96), (64, True, 2)]:
        cache = PrefixKVCache(1, 3, 64, chunk_size=64, max_tokens=4096, dtype=torch.bfloat16)
        prompt = list(range(tokens))
        seq = cache.add_sequence(prompt)
        ws = cpu_workspace(cache, cache.extend([seq], [prompt]), 9, 3, 64, amx=amx)
        assert ws.num_private_tasks == want_tiles, (tokens, amx, ws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_prefetch_changes_nothing_but_time(dtype):
    """The K/V prefetch (on by default) only asks for memory: outputs are bit-identical with it off."""
    ops = torch.ops.chunkattn_cpu
    torch.manual_seed(5)
    cache, batch = shared_prompt_batch(batch=6, shared=300, private=90, chunk_size=32, head_dim=64, kv_heads=3,
                                       dtype=dtype, decode=True)
    q = torch.randn(batch.num_new_tokens, 9, 64).to(dtype)
    on = chunkattn.attention(q, cache, batch, 0, backend="cpu")
    assert ops.set_prefetch(False) is True
    try:
        off = chunkattn.attention(q, cache, batch, 0, backend="cpu")
    finally:
        assert ops.set_prefetch(True) is False
    assert torch.equal(on, off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", [1, 16, 37, 64, 128])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 8, 64), (32, 8, 64), (12, 4, 128)])
def test_cpu_kernel_wide_blocks_of_any_length(dtype, keys, q_heads, kv_heads, head_dim):
    """Wide decode tasks take their keys in blocks (chunkattn_cpu.set_wide_block; 0: 64 for bf16 at d = 64 on
    AVX512-BF16 dot products, else 16): any block length gives the reference's attention, over lists that are
    not a multiple of it, with and without splits."""
    ops = torch.ops.chunkattn_cpu
    torch.manual_seed(keys + q_heads)
    cache, batch = shared_prompt_batch(batch=3, shared=70, private=301, chunk_size=32, head_dim=head_dim,
                                       kv_heads=kv_heads, dtype=dtype, decode=True)
    assert ops.set_wide_block(keys) == 0
    try:
        check_attention(cache, batch, q_heads, "cpu")
    finally:
        assert ops.set_wide_block(0) == keys
    with pytest.raises(RuntimeError, match="set_wide_block"):
        ops.set_wide_block(129)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_piece,min_split", [(64, 64), (4096, 4096)])
def test_cpu_kernel_shared_pieces_and_decode_splits(dtype, min_piece, min_split, monkeypatch):
    """Shared runs cut into pieces of whole chunks (each a partial per row, merged) and long decode lists split
    over several tasks, or neither: the same attention either way."""
    monkeypatch.setattr(cpu_tpp(), "MIN_PIECE_TOKENS", min_piece)
    monkeypatch.setattr(cpu_tpp(), "MIN_SPLIT_TOKENS", min_split)
    torch.manual_seed(min_piece + 3)
    for decode in (True, False):
        cache, batch = shared_prompt_batch(batch=5, shared=700, private=300, chunk_size=32, head_dim=64,
                                           kv_heads=3, dtype=dtype, decode=decode)
        check_attention(cache, batch, 9, "cpu")
        if decode:
            ws = cpu_workspace(cache, batch, 9, 3, 64)
            split = min_piece < 700
            assert (ws.num_shared_tasks > 1) == split and (ws.num_wide_tasks > 5) == split, ws


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_prefill_after_an_unaligned_cached_prefix(dtype):
    """Rows of a tile that precede a key block see none of it (a cached prefix of 300 tokens puts tile and block
    boundaries out of step): their probabilities must be zero, not a previous block's."""
    rng = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 1000, (520,), generator=rng).tolist()
    cache = PrefixKVCache(1, 3, 64, chunk_size=64, max_tokens=2048, dtype=dtype)
    first = cache.add_sequence(prompt[:300] + [7])
    random_store(cache, cache.extend([first], [prompt[:300] + [7]]))
    cache.release(first)
    seq = cache.add_sequence(prompt)
    assert seq.num_cached_tokens == 300
    batch = cache.extend([seq], [prompt[300:]])
    random_store(cache, batch)
    check_attention(cache, batch, 9, "cpu")


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("kv_heads,q_heads,tokens", [(1, 1, 16), (2, 2, 37), (1, 3, 6), (3, 9, 150), (8, 8, 20)])
def test_cpu_kernel_key_major_prefill(head_dim, kv_heads, q_heads, tokens):
    """float32 tasks of >= 16 query rows take the key-major path on AVX-512 CPUs (scores transposed, rows along
    the vector lanes, padded to a multiple of 16): exactly 16 rows, padded tiles, a prefill after a cached
    prefix (a block that some rows precede), causal masks inside blocks, every head size with a fixed value
    path, and key rows a multiple of 4 KB apart (8 heads x 128 dims)."""
    rng = torch.Generator().manual_seed(head_dim * 31 + tokens)
    prompt = torch.randint(0, 1000, (tokens + 45,), generator=rng).tolist()
    cache = PrefixKVCache(1, kv_heads, head_dim, chunk_size=16, max_tokens=4096, dtype=torch.float32)
    first = cache.add_sequence(prompt[:45] + [3])
    random_store(cache, cache.extend([first], [prompt[:45] + [3]]))
    cache.release(first)
    prompts = [prompt, prompt[:40] + prompt[45:]]
    seqs = [cache.add_sequence(p) for p in prompts]
    batch = cache.extend(seqs, [p[s.num_cached_tokens:] for s, p in zip(seqs, prompts)])
    random_store(cache, batch)
    check_attention(cache, batch, q_heads, "cpu")


def amx_and_dot(q: torch.Tensor, cache: PrefixKVCache, batch: chunkattn.Batch,
                counter: Callable[[], int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The cpu backend's output with AMX on, then with it off on the same plan (asserting that ``counter``, one of
    the kernel's AMX task counters, did not move), and how many tasks ``counter`` counted with AMX on."""
    ops = torch.ops.chunkattn_cpu
    tasks = counter()
    amx = chunkattn.attention(q, cache, batch, 0, backend="cpu")
    ran = counter() - tasks
    try:
        assert ops.set_amx(False) is False
        tasks = counter()
        dot = chunkattn.attention(q, cache, batch, 0, backend="cpu")
        assert counter() == tasks
    finally:
        assert ops.set_amx(True) is True
    return amx, dot, ran


def _amx_active() -> bool:
    from chunkattn import native

    return native.available() and bool(torch.ops.chunkattn_cpu.amx_active())


@pytest.mark.skipif(not _amx_active(), reason="needs a CPU with AMX (amx_bf16) and a kernel that grants tile state")
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("kv_heads,q_heads", [(3, 9), (2, 2), (1, 4)])
@pytest.mark.parametrize("chunk_size,shared,private,batch_size,decode", [
    (16, 97, 5, 17, True),  # shared chunks 16 keys in a row (read in place), a partial last one (gathered)
    (24, 300, 40, 5, True),  # 16-key groups across chunk boundaries (gathered), several key blocks
    (64, 1030, 140, 6, False),  # prefill after a cached prefix: causal masks inside blocks, padded row tiles
    (16, 0, 150, 2, False),  # nothing shared: private tasks only
])
def test_cpu_kernel_bf16_amx_path(head_dim, kv_heads, q_heads, chunk_size, shared, private, batch_size, decode):
    """bfloat16 tasks of >= 4 query rows run on AMX tiles (scores transposed from keys read in place, a key-major
    softmax, transposed values): against the reference, and against the AVX512-BF16 path on the same inputs."""
    torch.manual_seed(head_dim * 7 + q_heads + shared)
    cache, batch = shared_prompt_batch(batch=batch_size, shared=shared, private=private, chunk_size=chunk_size,
                                       head_dim=head_dim, kv_heads=kv_heads, dtype=torch.bfloat16, decode=decode)
    q = torch.randn(batch.num_new_tokens, q_heads, head_dim).to(torch.bfloat16)
    ref = chunkattn.attention(q, cache, batch, 0, backend="reference")
    amx, dot, ran = amx_and_dot(q, cache, batch, torch.ops.chunkattn_cpu.amx_tasks)
    assert ran > 0, "no task took the AMX path"
    assert rel_err(amx, ref) <= REL_TOL[torch.bfloat16]
    assert rel_err(amx, dot) <= REL_TOL[torch.bfloat16] / 2  # both round the probabilities to bf16 the same way


@pytest.mark.skipif(not _amx_active(), reason="needs a CPU with AMX (amx_bf16) and a kernel that grants tile state")
@pytest.mark.parametrize("head_dim,kv_heads,q_heads,chunk_size,shared,private,batch_size", [
    (64, 8, 32, 64, 0, 300, 3),  # Llama-3.2-1B's heads: two 16-row column tiles of 4 heads, runs read in place
    (128, 4, 4, 24, 5, 203, 3),  # no GQA (one useful column per head), runs gathered across chunk boundaries
    (64, 3, 9, 16, 97, 70, 5),  # SmolLM2's heads: a column tile of 9 rows, heads straddling nothing
    (32, 5, 10, 24, 0, 90, 2),  # groups of 2 over 10 rows, d = 32 (one depth step)
    (96, 2, 6, 16, 40, 35, 4),  # groups of 3 straddling no tile, d = 96 (three depth steps), after a shared prefix
    (256, 1, 16, 32, 0, 77, 2),  # a group of 16 (every row one head), d = 256 (the largest)
    (128, 3, 48, 64, 0, 40, 2),  # groups of 16 over three column tiles; two runs in place, then a partial one
    (64, 6, 30, 16, 0, 1500, 1),  # groups of 5 straddling column tiles; one long sequence split over tasks
])
def test_cpu_kernel_bf16_amx_wide_decode(head_dim, kv_heads, q_heads, chunk_size, shared, private, batch_size):
    """bf16 decode tokens on AMX run every head at once (run_wide_amx: scores of several heads' rows in one tile
    from keys read in place, values as stored against even/odd probability pairs) for any GQA group up to 16:
    against the reference, and against the AVX512-BF16 wide task on the same plan."""
    torch.manual_seed(head_dim * 3 + q_heads + private)
    cache, batch = shared_prompt_batch(batch=batch_size, shared=shared, private=private, chunk_size=chunk_size,
                                       head_dim=head_dim, kv_heads=kv_heads, dtype=torch.bfloat16, decode=True)
    ws = cpu_workspace(cache, batch, q_heads, kv_heads, head_dim, amx=True)
    assert ws.num_wide_tasks >= batch_size, ws
    q = torch.randn(batch.num_new_tokens, q_heads, head_dim).to(torch.bfloat16)
    ref = chunkattn.attention(q, cache, batch, 0, backend="reference")
    amx, dot, ran = amx_and_dot(q, cache, batch, torch.ops.chunkattn_cpu.amx_wide_tasks)
    assert ran >= batch_size, "a decode token did not take the AMX wide task"
    assert torch.isfinite(amx.float()).all()
    assert rel_err(amx, ref) <= REL_TOL[torch.bfloat16]
    assert rel_err(amx, dot) <= REL_TOL[torch.bfloat16] / 2


@pytest.mark.skipif(not _amx_active(), reason="needs a CPU with AMX (amx_bf16) and a kernel that grants tile state")
@pytest.mark.parametrize("decode,shared,private", [(True, 1500, 40), (False, 1500, 40), (True, 0, 1500)])
@pytest.mark.parametrize("rise", [1, 12])
def test_cpu_kernel_bf16_amx_rising_scores(decode, shared, private, rise):
    """Scores that rise block after block (keys along u growing with their row, queries along u: `rise` log2
    units more per 128-key block): the AMX softmax's one-pass exponentiation against a row's reference maximum
    must notice when a block's probabilities sum past 2^8 and redo it, keeping the reference while no key exceeds
    it by 8 log2 units (rise 1) and moving it when one does (rise 12: ~140 units over 1500 keys, so a reference
    that never moved would overflow float32); after a shared prompt and, with nothing shared, over a decode token's
    1500 own keys (the wide AMX task's softmax); against the reference attention."""
    torch.manual_seed(11 + decode + rise + shared)
    d = 64
    cache, batch = shared_prompt_batch(batch=6, shared=shared, private=private, chunk_size=64, head_dim=d,
                                       kv_heads=1, dtype=torch.bfloat16, decode=decode)
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    rows = cache.k_cache.shape[1]
    scale = torch.arange(rows, dtype=torch.float32) * rise / 128
    cache.k_cache[0] = (scale[:, None, None] * u).to(torch.bfloat16)
    q = (u * (d**0.5 / math.log2(math.e)) + 0.05 * torch.randn(batch.num_new_tokens, 3, d)).to(torch.bfloat16)
    ref = chunkattn.attention(q, cache, batch, 0, backend="reference")
    out = chunkattn.attention(q, cache, batch, 0, backend="cpu")
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) <= REL_TOL[torch.bfloat16]


@pytest.mark.skipif(not _amx_active(), reason="needs a CPU with AMX (amx_bf16) and a kernel that grants tile state")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads,q_heads", [(3, 9), (1, 4)])
def test_cpu_kernel_bf16_amx_fused_private_tasks(head_dim, kv_heads, q_heads):
    """On AMX tiles a shared task whose rows are whole sequences sharing only its keys also runs their private
    tasks and writes their outputs (no partials, no merge): a prefill after a cached prompt with sequences of odd
    lengths packed into tiles, beside one longer than a tile (split, merged as before) and two that also share a
    few-shot prefix (two runs: merged as before). Against the reference, on AMX and, with the same plan, on the
    other bf16 path (which must honour the fused tasks too)."""
    ops = torch.ops.chunkattn_cpu
    rng = random.Random(head_dim + q_heads)
    torch.manual_seed(head_dim + q_heads)

    def toks(n: int) -> list[int]:
        return [rng.randrange(1000) for _ in range(n)]

    shared, few = toks(300), toks(80)
    cache = PrefixKVCache(1, kv_heads, head_dim, chunk_size=16, max_tokens=4096, dtype=torch.bfloat16)
    warm = cache.add_sequence(shared + few + [1])
    random_store(cache, cache.extend([warm], [shared + few + [1]]))
    prompts = [shared + toks(n) for n in (20, 37, 60, 5, 200, 33, 1)] + [shared + few + toks(n) for n in (25, 40)]
    seqs = [cache.add_sequence(p) for p in prompts]
    batch = cache.extend(seqs, [p[s.num_cached_tokens:] for s, p in zip(seqs, prompts)])
    random_store(cache, batch)
    q = torch.randn(batch.num_new_tokens, q_heads, head_dim).to(torch.bfloat16)
    ref = chunkattn.attention(q, cache, batch, 0, backend="reference")
    out = chunkattn.attention(q, cache, batch, 0, backend="cpu")
    [ws] = [w for k, w in cache.plan(batch).workspaces.items() if k.startswith("cpu:")]
    assert ws.num_fused_tasks >= 3, "no private task ran inside its shared task"
    assert rel_err(out, ref) <= REL_TOL[torch.bfloat16]
    try:
        ops.set_amx(False)
        other = chunkattn.attention(q, cache, batch, 0, backend="cpu")  # same plan, same fused tasks
    finally:
        ops.set_amx(True)
    assert rel_err(other, ref) <= REL_TOL[torch.bfloat16]


def test_cpu_kernel_decode_steps_keep_their_workspace():
    cache, batch = shared_prompt_batch(batch=6, shared=70, private=3, chunk_size=16, head_dim=32, kv_heads=2,
                                       dtype=torch.float32, decode=True)
    check_attention(cache, batch, 4, "cpu")
    plan = cache.plan(batch)
    [ws] = [w for k, w in plan.workspaces.items() if k.startswith("cpu:")]
    advanced = 0
    for step in range(8):
        batch = cache.extend(list(batch.seqs), [[500 + step]] * batch.num_seqs)
        random_store(cache, batch)
        check_attention(cache, batch, 4, "cpu")
        if cache.plan(batch) is plan:
            advanced += 1
            assert any(w is ws for w in plan.workspaces.values())
    assert advanced >= 5


def test_cpu_backend_refuses_what_it_cannot_run():
    cache, batch = shared_prompt_batch(batch=2, shared=4, private=2, chunk_size=4, head_dim=16, kv_heads=1,
                                       dtype=torch.float16, decode=True)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        chunkattn.attention(torch.randn(2, 1, 16).half(), cache, batch, 0, backend="cpu")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_decode_group_of_four_after_a_shared_prompt(dtype):
    """Llama-3.2-1B's heads (4 query heads per K/V head, d = 64): decode tokens run wide tasks beside the shared
    tasks of a long common prefix, their partials merged."""
    torch.manual_seed(41)
    cache, batch = shared_prompt_batch(batch=33, shared=1030, private=75, chunk_size=64, head_dim=64, kv_heads=2,
                                       dtype=dtype, decode=True)
    check_attention(cache, batch, 8, "cpu")
