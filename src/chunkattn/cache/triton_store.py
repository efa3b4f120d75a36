"""Triton kernel that scatters new tokens' K and V into their chunk rows, both in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, src_rows_ptr, dst_rows_ptr, num_kv_heads,
    stride_kn, stride_kh, stride_vn, stride_vh, stride_kct, stride_kch, stride_vct, stride_vch,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One new token: its ``[num_kv_heads, head_dim]`` K and V rows to cache row ``dst_rows[i]``."""
    i = tl.program_id(0)
    src = tl.load(src_rows_ptr + i).to(tl.int64)
    dst = tl.load(dst_rows_ptr + i).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    ok = heads < num_kv_heads
    k = tl.load(k_ptr + src * stride_kn + heads * stride_kh + offs_d, mask=ok)
    tl.store(k_cache_ptr + dst * stride_kct + heads * stride_kch + offs_d, k, mask=ok)
    v = tl.load(v_ptr + src * stride_vn + heads * stride_vh + offs_d, mask=ok)
    tl.store(v_cache_ptr + dst * stride_vct + heads * stride_vch + offs_d, v, mask=ok)


def triton_store(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """``k_cache[dst_rows[i]] = k[src_rows[i]]`` (and V) for every i.

    k_cache, v_cache: ``[num_kv_rows, num_kv_heads, head_dim]`` (one layer); k, v: ``[num_new_tokens,
    num_kv_heads, head_dim]``, contiguous in head_dim; head_dim a power of two.
    """
    num, heads, head_dim = dst_rows.numel(), k.shape[1], k.shape[2]
    if num == 0:
        return
    _store_kernel[(num,)](
        k, v, k_cache, v_cache, src_rows, dst_rows, heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads),
    )
