"""The fused decoder layers (native CPU kernels, PyTorch elsewhere) against plain PyTorch formulas."""

from __future__ import annotations

import pytest
import torch

from chunkattn import native
from chunkattn.model.layers import RMSNorm, apply_rope_, rope_cos_sin, silu_and_mul

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # float16 takes the PyTorch path on the CPU


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_native_kernels_build_here():
    assert native.available(), "the dev and CI machines have a compiler: the native kernels must build"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,head_dim,extra", [(1, 1, 8, 0), (7, 12, 64, 192), (33, 5, 128, 0), (3, 2, 18, 5),
                                                      (5, 3, 40, 3)])  # 40: 16 pairs a vector, then 4
def test_rope_in_place_matches_rotate_half(dtype, rows, heads, head_dim, extra):
    x = torch.randn(rows, heads * head_dim + extra).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    cos, sin = rope_cos_sin(inv_freq, torch.randint(0, 5000, (rows,)))
    ref = x.float().clone()
    h = ref[:, : heads * head_dim].view(rows, heads, head_dim)
    rotated = torch.cat((-h[..., head_dim // 2 :], h[..., : head_dim // 2]), dim=-1)
    full_cos, full_sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    ref[:, : heads * head_dim] = (h * full_cos + rotated * full_sin).reshape(rows, -1)
    apply_rope_(x, cos, sin, heads, head_dim)
    assert rel(x, ref) < TOL[dtype]
    assert torch.equal(x[:, heads * head_dim :], ref[:, heads * head_dim :].to(dtype))  # the rest untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(1, 16), (5, 1536), (9, 37), (64, 100)])
def test_silu_and_mul(dtype, rows, inner):
    x = (torch.randn(rows, 2 * inner) * 4).to(dtype)
    x[0, 0], x[0, 1] = -200.0, 200.0  # the sigmoid's saturated ends
    ref = torch.nn.functional.silu(x[:, :inner].float()) * x[:, inner:].float()
    out = silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (rows, inner)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (17, 576), (4, 50)])
def test_rms_norm_with_and_without_the_residual_add(dtype, rows, hidden):
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)

    def ref_norm(t: torch.Tensor) -> torch.Tensor:  # Hugging Face's LlamaRMSNorm
        t32 = t.float()
        t32 = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)
        return norm.weight.float() * t32.to(dtype).float()

    with torch.inference_mode():
        plain = norm(x.clone())
        assert rel(plain, ref_norm(x)) < TOL[dtype]
        want_res = (residual.float() + x.float()).to(dtype)
        out, res = norm(x.clone(), residual.clone())
    assert torch.equal(res, want_res)
    assert rel(out, ref_norm(want_res)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,gather", [(1, False), (37, False), (300, True), (0, False)])
def test_store_kv_scatters_rows_as_index_copy_does(dtype, rows, gather):
    """The K/V cache's native scatter: row views of a fused QKV tensor (their own row stride), with and without a
    gather of source rows; the pool's write takes it on the CPU; a bad index raises before anything is written."""
    from chunkattn.cache.pool import KVPool

    gen = torch.Generator().manual_seed(rows * 7 + gather)
    heads, head_dim, slots = 3, 64, 1024
    qkv = torch.randn(rows + 5, (9 + 2 * heads) * head_dim, generator=gen).to(dtype)
    k = qkv[:, 9 * head_dim:(9 + heads) * head_dim].view(-1, heads, head_dim)
    v = qkv[:, (9 + heads) * head_dim:].view(-1, heads, head_dim)
    dst = torch.randperm(slots, generator=gen)[:rows]
    src = torch.randperm(rows + 5, generator=gen)[:rows] if gather else torch.arange(rows + 5)[:rows]
    if not gather:
        k, v = k[:rows], v[:rows]
    pool = KVPool(2, slots // 16, 16, heads, head_dim, dtype, torch.device("cpu"))
    want_k, want_v = pool.k[1].clone(), pool.v[1].clone()
    want_k.index_copy_(0, dst, k.index_select(0, src))
    want_v.index_copy_(0, dst, v.index_select(0, src))
    pool.write(1, k, v, src, dst, all_rows=not gather)
    assert pool._native_store or rows == 0  # (0 rows: nothing to write, nothing decided)
    assert torch.equal(pool.k[1], want_k) and torch.equal(pool.v[1], want_v)
    assert not pool.k[0].any() and not pool.v[0].any()  # the other layer untouched
    if rows:
        before = pool.k.clone()
        with pytest.raises(RuntimeError, match="destination row"):
            torch.ops.chunkattn_layers.store_kv_(pool.k[1], pool.v[1], k, v, torch.full_like(dst, slots),
                                                 src if gather else None)
        with pytest.raises(RuntimeError, match="source row"):
            torch.ops.chunkattn_layers.store_kv_(pool.k[1], pool.v[1], k, v, dst, torch.full_like(dst, -1))
        assert torch.equal(pool.k, before)
