"""Triton kernels against the float64 reference. On the CPU they run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small; on a GPU the same tests run compiled (and bf16 is checked too)."""

from __future__ import annotations

import pytest
import torch

import chunkattn
from chunkattn.attention import resolve_backend
from chunkattn.attention.triton_tpp import TritonWorkspace, triton_attention
from helpers import REL_TOL, check_attention, rel_err
from test_attention import random_store, shared_prompt_batch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def build(**kw):
    kw.setdefault("dtype", torch.float32)
    return shared_prompt_batch(device=DEVICE, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_triton_matches_reference(dtype, decode, group):
    cache, batch = build(batch=3, shared=37, private=9, chunk_size=16, head_dim=32, kv_heads=2, dtype=dtype,
                         decode=decode)
    check_attention(cache, batch, 2 * group, "triton")


@pytest.mark.parametrize("chunk_size", [1, 16, 128])
@pytest.mark.parametrize("shared", [0, 20])
def test_triton_chunk_sizes_and_no_sharing(chunk_size, shared):
    cache, batch = build(batch=2, shared=shared, private=5, chunk_size=chunk_size, head_dim=16, kv_heads=1,
                         decode=True)
    check_attention(cache, batch, 2, "triton")


@pytest.mark.parametrize("head_dim", [64, 128] + ([256] if CUDA else []))
def test_triton_head_dims(head_dim):
    cache, batch = build(batch=2, shared=17, private=3, chunk_size=16, head_dim=head_dim, kv_heads=1,
                         decode=True)
    check_attention(cache, batch, 1, "triton")


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("decode", [True, False])
def test_split_private_chunks_are_merged_exactly(num_splits, decode):
    """Flash-decoding split of long private chunk lists, including splits with no chunk at all."""
    cache, batch = build(batch=2, shared=16, private=70, chunk_size=16, head_dim=16, kv_heads=2, decode=decode)
    plan = cache.plan(batch)
    q = torch.randn(batch.num_new_tokens, 4, 16, device=DEVICE)
    ref, ref_lse = chunkattn.attention(q, cache, batch, 0, backend="reference", return_lse=True)
    out, lse = triton_attention(q, cache.k_cache[0], cache.v_cache[0], plan, 16**-0.5, num_splits=num_splits)
    assert rel_err(out, ref) < REL_TOL[torch.float32]
    assert rel_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("per_program", [1, 3, 100])
def test_shared_chunks_swept_per_program(per_program):
    """Chunk-first programs sweeping 1, 3 or all shared chunks of a run give the same result."""
    cache, batch = build(batch=3, shared=70, private=4, chunk_size=16, head_dim=16, kv_heads=2, decode=False)
    plan = cache.plan(batch)
    assert plan.num_shared >= 4
    q = torch.randn(batch.num_new_tokens, 4, 16, device=DEVICE)
    ref = chunkattn.attention(q, cache, batch, 0, backend="reference")
    out, _ = triton_attention(q, cache.k_cache[0], cache.v_cache[0], plan, 16**-0.5,
                              shared_chunks_per_program=per_program)
    assert rel_err(out, ref) < REL_TOL[torch.float32]


def test_decode_steps_reuse_plan_and_workspace():
    """Between structural changes only lengths advance: same plan, same Triton buffers, still exact."""
    cache, batch = build(batch=3, shared=33, private=2, chunk_size=16, head_dim=16, kv_heads=1, decode=True)
    check_attention(cache, batch, 2, "triton")
    plan = cache.plan(batch)
    workspaces = {k: w for k, w in plan.workspaces.items() if isinstance(w, TritonWorkspace)}
    assert workspaces
    advanced = 0
    for step in range(6):
        batch = cache.extend(list(batch.seqs), [[100 + step]] * batch.num_seqs)
        random_store(cache, batch)
        check_attention(cache, batch, 2, "triton")
        if cache.plan(batch) is plan:
            advanced += 1
            assert all(plan.workspaces[k] is w for k, w in workspaces.items())
    assert advanced >= 3


def test_auto_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) != "triton"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_triton_rejects_unsupported_head_dim():
    cache, batch = build(batch=2, shared=4, private=2, chunk_size=4, head_dim=24, kv_heads=1, decode=True)
    q = torch.randn(batch.num_new_tokens, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        chunkattn.attention(q, cache, batch, 0, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_store_kernel_scatters_like_index_copy(dtype, kv_heads):
    from chunkattn.cache.triton_store import triton_store

    k_cache = torch.zeros(40, kv_heads, 16, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(7, kv_heads, 16, device=DEVICE).to(dtype)
    v = torch.randn(7, kv_heads, 16, device=DEVICE).to(dtype)
    src = torch.tensor([0, 2, 3, 6], device=DEVICE)  # rows 1, 4, 5 were already stored (not written again)
    dst = torch.tensor([5, 17, 18, 39], device=DEVICE)
    triton_store(k_cache, v_cache, k, v, src, dst)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.index_copy_(0, dst, k[src])
    ref_v.index_copy_(0, dst, v[src])
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter is lenient: compile every kernel for sm_90 too (a subprocess: no TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(script), "fp16,bf16", "128"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 12 kernels" in done.stdout
