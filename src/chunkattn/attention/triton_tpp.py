"""Two-phase-partition attention in Triton: chunk-first, sequence-first (split-K) and merge kernels.

Storage is one layer's ``k, v: [num_kv_rows, num_kv_heads, head_dim]``; a chunk is ``len`` consecutive rows
from ``kv_begin``. Inside the kernels softmax runs in base 2 (``exp2`` with ``log2(e)`` folded into the
scale); the returned LSE is converted to natural log. All row offsets are int64.

Launch sequence per layer (no host synchronisation, no allocation but the output):
1. ``_chunk_first_kernel``  grid (num_items, Hkv): an item is a few consecutive shared chunks used by the same
   sequences; each chunk's K/V tile is loaded once and multiplied by the queries of every sequence sharing it
   (rows = query rows x GQA group); one partial (o, m, l) per (item, query row).
2. ``_seq_first_kernel``    grid (num_tiles, Hkv, num_splits): a tile of one sequence's query rows over its
   private chunks, causal, online softmax; long chunk lists are split across programs (flash-decoding). In
   decode with one split it also merges the row's chunk-first partials and writes the output (no step 3).
3. ``_merge_kernel``        grid (num_rows, Hq / BLOCK_H): merges a row's split partials and shared partials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chunkattn.cache.plan import AttentionPlan

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # kernels read only constexpr globals


@triton.jit
def _merge_state(acc, m_run, l_run, o, m, l_sum):
    """Online-softmax merge of the state (acc [M, D], m_run [M], l_run [M]) with a partial (o, m, l_sum),
    base 2. A partial or state with no keys has m = -inf, l = 0, o = 0."""
    m_new = tl.maximum(m_run, m)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m_run - m_safe)
    b = tl.exp2(m - m_safe)
    return acc * a[:, None] + o * b[:, None], m_new, l_run * a + l_sum * b


@triton.jit
def _query_tile(q_ptr, row, head, row_ok, stride_qn, stride_qh, offs_d,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A tile of query rows ``[BLOCK_M, HEAD_DIM]`` and an empty online-softmax state (acc, m, l) for it."""
    q = tl.load(q_ptr + row[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    return q, acc, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def _store_state(o_ptr, m_ptr, l_ptr, o_offsets, ml_offsets, acc, m_i, l_i, row_ok):
    """Write a partial: unnormalised output ``acc`` at ``o_offsets``, max and sum-exp at ``ml_offsets``."""
    tl.store(o_ptr + o_offsets, acc, mask=row_ok[:, None])
    tl.store(m_ptr + ml_offsets, m_i, mask=row_ok)
    tl.store(l_ptr + ml_offsets, l_i, mask=row_ok)


@triton.jit
def _merge_pairs(acc, m_run, l_run, o_part_ptr, m_part_ptr, l_part_ptr, row_pairs_ptr, p0, p1, heads, head_ok,
                 offs_d, stride_op, stride_poh, stride_mp):
    """Merge the chunk-first partials ``row_pairs[p0:p1]`` of one query row into its state (heads [M])."""
    for i in range(p0, p1):
        pair = tl.load(row_pairs_ptr + i).to(tl.int64)
        o = tl.load(o_part_ptr + pair * stride_op + heads[:, None] * stride_poh + offs_d[None, :],
                    mask=head_ok[:, None], other=0.0)
        m = tl.load(m_part_ptr + pair * stride_mp + heads, mask=head_ok, other=float("-inf"))
        l_sum = tl.load(l_part_ptr + pair * stride_mp + heads, mask=head_ok, other=0.0)
        acc, m_run, l_run = _merge_state(acc, m_run, l_run, o, m, l_sum)
    return acc, m_run, l_run


@triton.jit
def _store_output(out_ptr, lse_ptr, out_offsets, lse_offsets, acc, m_run, l_run, ok):
    """Normalise and write the final output (in out's dtype) and the natural-log LSE."""
    l_safe = tl.where(ok, l_run, 1.0)
    tl.store(out_ptr + out_offsets, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(lse_ptr + lse_offsets, (m_run + tl.log2(l_safe)) * LN2, mask=ok)


@triton.jit
def _attend_chunk(q, acc, m_i, l_i, k_ptr, v_ptr, kv_begin, num_keys, key_pos0, q_pos,
                  stride_kt, stride_vt, offs_d, qk_scale,
                  CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one chunk (``num_keys`` rows from ``kv_begin``; k_ptr/v_ptr already at the K/V head) into the
    online-softmax state of the query tile ``q [M, D]``, ``BLOCK_N`` keys at a time."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, num_keys, BLOCK_N):
        key_ok = n0 + offs_n < num_keys
        key_rows = kv_begin + n0 + offs_n
        k = tl.load(k_ptr + key_rows[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + key_rows[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, BLOCK_N]
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (key_pos0 + n0 + offs_n[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _chunk_first_kernel(
    q_ptr, k_ptr, v_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr,
    chunk_kv_begin_ptr, chunk_len_ptr, item_chunk_begin_ptr, item_pair_indptr_ptr, pair_row_ptr,
    stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_op, stride_oh, stride_mp,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One item (a few consecutive shared chunks with the same sequences) x one K/V head: every query row of
    every sequence sharing them, as tiles of BLOCK_M (query row, group head) rows, against each chunk's K/V
    tile in turn; one partial (o, m, l) per (item, query row) pair."""
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk0 = tl.load(item_chunk_begin_ptr + item)
    chunk1 = tl.load(item_chunk_begin_ptr + item + 1)
    pair0 = tl.load(item_pair_indptr_ptr + item)
    num_rows = (tl.load(item_pair_indptr_ptr + item + 1) - pair0) * GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for m0 in range(0, num_rows, BLOCK_M):
        idx = m0 + offs_m
        row_ok = idx < num_rows
        pair = (pair0 + idx // GROUP).to(tl.int64)
        head = kv_head * GROUP + idx % GROUP
        q_row = tl.load(pair_row_ptr + pair, mask=row_ok, other=0).to(tl.int64)
        q, acc, m_i, l_i = _query_tile(q_ptr, q_row, head, row_ok, stride_qn, stride_qh, offs_d,
                                       BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM)
        for c in range(chunk0, chunk1):
            kv_begin = tl.load(chunk_kv_begin_ptr + c).to(tl.int64)
            acc, m_i, l_i = _attend_chunk(q, acc, m_i, l_i, k_head, v_head, kv_begin, tl.load(chunk_len_ptr + c),
                                          0, m_i, stride_kt, stride_vt, offs_d, qk_scale,
                                          CAUSAL=False, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION)
        _store_state(o_part_ptr, m_part_ptr, l_part_ptr,
                     pair[:, None] * stride_op + head[:, None] * stride_oh + offs_d[None, :],
                     pair * stride_mp + head, acc, m_i, l_i, row_ok)


@triton.jit
def _seq_first_kernel(
    q_ptr, k_ptr, v_ptr,
    o_split_ptr, m_split_ptr, l_split_ptr,
    tile_seq_ptr, tile_row0_ptr, tile_num_rows_ptr, q_pos_ptr,
    private_indptr_ptr, private_kv_begin_ptr, private_len_ptr, private_pos_ptr,
    out_ptr, lse_ptr, o_part_ptr, m_part_ptr, l_part_ptr, row_pair_indptr_ptr, row_pairs_ptr,
    stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_on, stride_os, stride_oh, stride_mn, stride_ms,
    stride_outn, stride_outh, stride_lse, stride_op, stride_poh, stride_mp,
    qk_scale, chunks_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSE_MERGE: tl.constexpr,
):
    """A tile of one sequence's query rows x one K/V head x one split of its private chunks, causal.

    FUSE_MERGE (decode, one split): the tile is one query row; merge its chunk-first partials here and write
    the final output, so no merge kernel runs."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    num_rows = tl.load(tile_num_rows_ptr + tile) * GROUP
    first = tl.load(private_indptr_ptr + seq)
    last = tl.load(private_indptr_ptr + seq + 1)
    lo = first + split * chunks_per_split
    hi = tl.minimum(lo + chunks_per_split, last)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < num_rows
    row = (row0 + offs_m // GROUP).to(tl.int64)
    head = kv_head * GROUP + offs_m % GROUP
    q_pos = tl.load(q_pos_ptr + row, mask=row_ok, other=0)
    q, acc, m_i, l_i = _query_tile(q_ptr, row, head, row_ok, stride_qn, stride_qh, offs_d,
                                   BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM)
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for c in range(lo, hi):
        kv_begin = tl.load(private_kv_begin_ptr + c).to(tl.int64)
        acc, m_i, l_i = _attend_chunk(q, acc, m_i, l_i, k_head, v_head, kv_begin, tl.load(private_len_ptr + c),
                                      tl.load(private_pos_ptr + c), q_pos, stride_kt, stride_vt, offs_d,
                                      qk_scale, CAUSAL=True, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION)
    if FUSE_MERGE:
        p0 = tl.load(row_pair_indptr_ptr + row0)
        p1 = tl.load(row_pair_indptr_ptr + row0 + 1)
        acc, m_i, l_i = _merge_pairs(acc, m_i, l_i, o_part_ptr, m_part_ptr, l_part_ptr, row_pairs_ptr, p0, p1,
                                     head, row_ok, offs_d, stride_op, stride_poh, stride_mp)
        _store_output(out_ptr, lse_ptr, row[:, None] * stride_outn + head[:, None] * stride_outh + offs_d[None, :],
                      row * stride_lse + head, acc, m_i, l_i, row_ok)
    else:
        _store_state(o_split_ptr, m_split_ptr, l_split_ptr,
                     row[:, None] * stride_on + split * stride_os + head[:, None] * stride_oh + offs_d[None, :],
                     row * stride_mn + split * stride_ms + head, acc, m_i, l_i, row_ok)


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr,
    o_split_ptr, m_split_ptr, l_split_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr,
    row_pair_indptr_ptr, row_pairs_ptr, num_splits, num_heads,
    stride_outn, stride_outh, stride_lse,
    stride_on, stride_os, stride_oh, stride_mn, stride_ms,
    stride_op, stride_poh, stride_mp,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One query row x BLOCK_H heads: merge the row's split partials and its shared-chunk partials."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    m_run = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_H], tl.float32)
    for s in range(0, num_splits):
        base = row * stride_on + s * stride_os
        o = tl.load(o_split_ptr + base + heads[:, None] * stride_oh + offs_d[None, :], mask=head_ok[:, None],
                    other=0.0)
        m = tl.load(m_split_ptr + row * stride_mn + s * stride_ms + heads, mask=head_ok, other=float("-inf"))
        l_sum = tl.load(l_split_ptr + row * stride_mn + s * stride_ms + heads, mask=head_ok, other=0.0)
        acc, m_run, l_run = _merge_state(acc, m_run, l_run, o, m, l_sum)
    p0 = tl.load(row_pair_indptr_ptr + row)
    p1 = tl.load(row_pair_indptr_ptr + row + 1)
    acc, m_run, l_run = _merge_pairs(acc, m_run, l_run, o_part_ptr, m_part_ptr, l_part_ptr, row_pairs_ptr, p0, p1,
                                     heads, head_ok, offs_d, stride_op, stride_poh, stride_mp)
    _store_output(out_ptr, lse_ptr, row * stride_outn + heads[:, None] * stride_outh + offs_d[None, :],
                  row * stride_lse + heads, acc, m_run, l_run, head_ok)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


@dataclass
class TritonWorkspace:
    """Per-plan launch metadata (device tensors) and partial-result buffers, built once per plan.

    Decode steps that only advance lengths keep it: the kernels read the plan's device arrays, which
    :meth:`AttentionPlan.advance` updates in place, so a captured CUDA graph stays valid.
    """

    num_heads: int
    head_dim: int
    group: int
    num_splits: int
    chunks_per_split: int
    rows_per_tile: int
    block_m_seq: int
    block_m_shared: int
    num_items: int  # chunk-first programs per K/V head
    tensors: dict[str, torch.Tensor]
    o_split: torch.Tensor  # [num_rows, num_splits, Hq, d] float32
    m_split: torch.Tensor  # [num_rows, num_splits, Hq]
    l_split: torch.Tensor
    o_part: torch.Tensor  # [num_pairs, Hq, d] float32: one chunk-first partial per (item, query row)
    m_part: torch.Tensor  # [num_pairs, Hq]
    l_part: torch.Tensor

    def advance(self, plan: AttentionPlan) -> None:
        """Nothing to do: lengths live in the plan's device arrays (see class doc)."""

    @classmethod
    def build(cls, plan: AttentionPlan, num_heads: int, num_kv_heads: int, head_dim: int,
              num_splits: int | None = None, shared_chunks_per_program: int | None = None) -> TritonWorkspace:
        dev = plan.device
        group = num_heads // num_kv_heads
        num_seqs, num_rows = plan.num_seqs, plan.num_rows
        q_indptr = plan.q_indptr
        # Query tiles: decode rows go one per program (rows = the GQA group); prefill rows in tiles of ~64.
        rows_per_tile = 1 if plan.is_decode else max(1, 64 // group)
        tile_seq, tile_row0, tile_rows = [], [], []
        for b in range(num_seqs):
            for r in range(q_indptr[b], q_indptr[b + 1], rows_per_tile):
                tile_seq.append(b)
                tile_row0.append(r)
                tile_rows.append(min(rows_per_tile, q_indptr[b + 1] - r))
        # Chunk-first items: runs of shared chunks cut into pieces of `shared_chunks_per_program` chunks, enough
        # pieces to fill the GPU; one partial per (item, query row) pair, so fewer items = less partial traffic.
        runs = plan.shared_runs()
        if shared_chunks_per_program is None:
            shared_chunks_per_program = 2
            if dev.type == "cuda":
                sms = torch.cuda.get_device_properties(dev).multi_processor_count
                shared_chunks_per_program = max(1, plan.num_shared * num_kv_heads // (2 * sms))
        item_chunk_begin: list[int] = []
        item_pair_indptr = [0]
        pair_row: list[int] = []
        row_pairs: list[list[int]] = [[] for _ in range(num_rows)]
        for begin, end in runs:
            users = plan.shared_users(begin)
            for c0 in range(begin, end, shared_chunks_per_program):
                item_chunk_begin.append(c0)
                for b in users:
                    for r in range(q_indptr[b], q_indptr[b + 1]):
                        row_pairs[r].append(len(pair_row))
                        pair_row.append(r)
                item_pair_indptr.append(len(pair_row))
        item_chunk_begin.append(plan.num_shared)  # items are back to back: item i ends where i + 1 begins
        max_pairs_per_item = max((b - a for a, b in zip(item_pair_indptr, item_pair_indptr[1:])), default=1)
        row_pair_indptr = [0]
        for pairs in row_pairs:
            row_pair_indptr.append(row_pair_indptr[-1] + len(pairs))
        # Split long private chunk lists so that the grid fills the GPU (flash-decoding).
        pi = plan.private_indptr
        max_chunks = max((pi[b + 1] - pi[b] for b in range(num_seqs)), default=0)
        if num_splits is None:
            num_splits = 1
            if dev.type == "cuda":
                programs = max(1, len(tile_seq) * num_kv_heads)
                sms = torch.cuda.get_device_properties(dev).multi_processor_count
                num_splits = max(1, min(max_chunks, math.ceil(2 * sms / programs)))
        num_splits = max(1, min(num_splits, max(1, max_chunks)))
        chunks_per_split = max(1, math.ceil(max_chunks / num_splits))
        num_splits = max(1, math.ceil(max_chunks / chunks_per_split)) if max_chunks else 1

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        tensors = {
            "tile_seq": t(tile_seq), "tile_row0": t(tile_row0), "tile_num_rows": t(tile_rows),
            "pair_row": t(pair_row), "item_chunk_begin": t(item_chunk_begin),
            "item_pair_indptr": t(item_pair_indptr),
            "row_pair_indptr": t(row_pair_indptr), "row_pairs": t([p for ps in row_pairs for p in ps]),
        }
        num_pairs = max(1, len(pair_row))

        def f32(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=dev)

        return cls(
            num_heads=num_heads, head_dim=head_dim, group=group, num_splits=num_splits,
            chunks_per_split=chunks_per_split, rows_per_tile=rows_per_tile,
            block_m_seq=_pow2(rows_per_tile * group),
            block_m_shared=_pow2(min(64, max_pairs_per_item * group)), num_items=len(item_pair_indptr) - 1,
            tensors=tensors,
            o_split=f32(num_rows, num_splits, num_heads, head_dim),
            m_split=f32(num_rows, num_splits, num_heads),
            l_split=f32(num_rows, num_splits, num_heads),
            o_part=f32(num_pairs, num_heads, head_dim),
            m_part=f32(num_pairs, num_heads),
            l_part=f32(num_pairs, num_heads),
        )


def _workspace(plan: AttentionPlan, num_heads: int, num_kv_heads: int, head_dim: int,
               num_splits: int | None, shared_chunks_per_program: int | None) -> TritonWorkspace:
    key = f"triton:{num_heads}:{num_kv_heads}:{head_dim}:{num_splits}:{shared_chunks_per_program}"
    ws = plan.workspaces.get(key)
    if not isinstance(ws, TritonWorkspace):
        ws = TritonWorkspace.build(plan, num_heads, num_kv_heads, head_dim, num_splits, shared_chunks_per_program)
        plan.workspaces[key] = ws
    return ws


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float,
    num_splits: int | None = None, shared_chunks_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-phase-partition attention with the Triton kernels.

    Parameters
    ----------
    q : ``[num_rows, num_q_heads, head_dim]``; k, v : ``[num_kv_rows, num_kv_heads, head_dim]`` (one layer),
        fp16, bf16 or fp32 (fp32 uses IEEE dot products: exact but slower).
    plan : the batch's plan (``PrefixKVCache.plan``).
    num_splits : split each sequence's private chunks over this many programs (default: enough to fill the
        GPU; 1 on the CPU interpreter).
    shared_chunks_per_program : consecutive shared chunks one chunk-first program sweeps (default: as many as
        still fill the GPU; 2 on the CPU interpreter).

    Returns ``out [num_rows, num_q_heads, head_dim]`` in ``q.dtype``, ``lse [num_rows, num_q_heads]`` float32
    (natural log).
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the triton backend needs head_dim a power of two >= 16, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    ws = _workspace(plan, num_heads, num_kv_heads, head_dim, num_splits, shared_chunks_per_program)
    pt, wt = plan.tensors, ws.tensors
    group = ws.group
    qk_scale = scale * LOG2E
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    chunk_block = _pow2(min(64, plan.chunk_size))
    out = torch.empty_like(q)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q.device)
    if plan.num_shared:
        _chunk_first_kernel[(ws.num_items, num_kv_heads)](
            q, k, v, ws.o_part, ws.m_part, ws.l_part,
            pt.shared_kv_begin, pt.shared_len, wt["item_chunk_begin"], wt["item_pair_indptr"], wt["pair_row"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            ws.o_part.stride(0), ws.o_part.stride(1), ws.m_part.stride(0),
            qk_scale,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=ws.block_m_shared, BLOCK_N=chunk_block,
            DOT_PRECISION=precision,
        )
    fuse_merge = ws.rows_per_tile == 1 and ws.num_splits == 1
    _seq_first_kernel[(wt["tile_seq"].numel(), num_kv_heads, ws.num_splits)](
        q, k, v, ws.o_split, ws.m_split, ws.l_split,
        wt["tile_seq"], wt["tile_row0"], wt["tile_num_rows"], pt.q_pos,
        pt.private_indptr, pt.private_kv_begin, pt.private_len, pt.private_pos,
        out, lse, ws.o_part, ws.m_part, ws.l_part, wt["row_pair_indptr"], wt["row_pairs"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ws.o_split.stride(0), ws.o_split.stride(1), ws.o_split.stride(2), ws.m_split.stride(0),
        ws.m_split.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), ws.o_part.stride(0), ws.o_part.stride(1),
        ws.m_part.stride(0),
        qk_scale, ws.chunks_per_split,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=ws.block_m_seq, BLOCK_N=chunk_block, DOT_PRECISION=precision,
        FUSE_MERGE=fuse_merge,
    )
    if fuse_merge:
        return out, lse
    block_h = min(16, triton.next_power_of_2(num_heads))
    _merge_kernel[(num_rows, triton.cdiv(num_heads, block_h))](
        out, lse, ws.o_split, ws.m_split, ws.l_split, ws.o_part, ws.m_part, ws.l_part,
        wt["row_pair_indptr"], wt["row_pairs"], ws.num_splits, num_heads,
        out.stride(0), out.stride(1), lse.stride(0),
        ws.o_split.stride(0), ws.o_split.stride(1), ws.o_split.stride(2), ws.m_split.stride(0),
        ws.m_split.stride(1),
        ws.o_part.stride(0), ws.o_part.stride(1), ws.m_part.stride(0),
        HEAD_DIM=head_dim, BLOCK_H=block_h,
    )
    return out, lse
