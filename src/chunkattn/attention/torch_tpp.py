"""Two-phase-partition attention in vectorized PyTorch (CPU or CUDA); no Python loop over sequences or chunks.

Chunk-first: consecutive shared chunks used by the same sequences form one *run*; every run's keys are read
once and multiplied by the stacked queries of all its sequences (GQA's query-head group folded into the rows),
giving partial (output, max, sum-exp). Sequence-first: each sequence's private chunks, causally masked. The
partials are merged by the online-softmax formulas. Arithmetic is float32 whatever the storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkattn.attention.backend import PlannedBackend, register_backend
from chunkattn.cache.plan import AttentionPlan


def pad_ranges(
    group_indptr: torch.Tensor, begin: torch.Tensor, length: torch.Tensor, pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out groups of integer ranges as padded rows.

    Group ``g`` is the concatenation of ranges ``group_indptr[g]:group_indptr[g+1]``; range ``r`` is
    ``begin[r] .. begin[r] + length[r] - 1`` and its elements have positions ``pos[r] + 0, 1, ...``.

    Returns ``index, position, valid``, each ``[num_groups, max_group_len]`` (padding: index 0,
    position ``2**62``, valid False).
    """
    dev = begin.device
    num_groups = group_indptr.numel() - 1
    num_ranges = begin.numel()
    ranges_per_group = group_indptr[1:] - group_indptr[:-1]
    group_of_range = torch.repeat_interleave(torch.arange(num_groups, device=dev), ranges_per_group)
    total = int(length.sum()) if num_ranges else 0
    group_len = torch.zeros(num_groups, dtype=torch.int64, device=dev).index_add_(0, group_of_range, length)
    width = int(group_len.max()) if num_groups else 0
    index = torch.zeros(num_groups, width, dtype=torch.int64, device=dev)
    position = torch.full((num_groups, width), 2**62, dtype=torch.int64, device=dev)
    valid = torch.zeros(num_groups, width, dtype=torch.bool, device=dev)
    if total:
        elem = torch.arange(total, device=dev)
        range_of_elem = torch.repeat_interleave(torch.arange(num_ranges, device=dev), length)
        offset = elem - (torch.cumsum(length, 0) - length)[range_of_elem]
        group = group_of_range[range_of_elem]
        col = elem - (torch.cumsum(group_len, 0) - group_len)[group]
        index[group, col] = begin[range_of_elem] + offset
        if pos is not None:
            position[group, col] = pos[range_of_elem] + offset
        valid[group, col] = True
    return index, position, valid


class _Buffers:
    """Reused gather and score buffers of one plan (CPU allocations of this size cost page faults)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, shape, dtype)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


@dataclass
class _SeqGroup:
    """Sequences of similar query counts, padded together for the sequence-first phase."""

    seq_rows: torch.Tensor  # [G, max_new]: query rows of each sequence
    seq_row_valid: torch.Tensor
    seq_row_pos: torch.Tensor  # [G, max_new]: their positions
    priv_rows: torch.Tensor  # [G, max_private_tokens]: K/V rows of each sequence's private chunks
    priv_pos: torch.Tensor
    priv_valid: torch.Tensor
    needs_mask: bool  # False when every key is real and before every query (decode, equal lengths)


def _seq_groups(plan: AttentionPlan) -> list[_SeqGroup]:
    """Bucket sequences by their number of new tokens (powers of two), so that one long prefill does not pad
    every decode row of the batch to its length."""
    dev = plan.device
    q_indptr, pi = plan.q_indptr, plan.private_indptr
    buckets: dict[int, list[int]] = {}
    for b in range(plan.num_seqs):
        n = q_indptr[b + 1] - q_indptr[b]
        buckets.setdefault(1 << (n - 1).bit_length(), []).append(b)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    groups = []
    for _, seqs in sorted(buckets.items()):
        num_new = [q_indptr[b + 1] - q_indptr[b] for b in seqs]
        first_pos = [plan.seq_lens[b] - n for b, n in zip(seqs, num_new)]
        chunks = [j for b in seqs for j in range(pi[b], pi[b + 1])]
        chunk_indptr = [0]
        for b in seqs:
            chunk_indptr.append(chunk_indptr[-1] + pi[b + 1] - pi[b])
        seq_rows, seq_row_pos, seq_row_valid = pad_ranges(
            torch.arange(len(seqs) + 1, device=dev), t([q_indptr[b] for b in seqs]), t(num_new), t(first_pos))
        priv_rows, priv_pos, priv_valid = pad_ranges(
            t(chunk_indptr), t([plan.private_kv_begin[j] for j in chunks]), t([plan.private_len[j] for j in chunks]),
            t([plan.private_pos[j] for j in chunks]))
        private_tokens = [sum(plan.private_len[pi[b] : pi[b + 1]]) for b in seqs]
        needs_mask = max(num_new) > 1 or len(set(private_tokens)) > 1
        groups.append(_SeqGroup(seq_rows, seq_row_valid, seq_row_pos, priv_rows, priv_pos, priv_valid, needs_mask))
    return groups


@dataclass
class _TorchWorkspace:
    """Padded gather indices and buffers of one plan. A decode step that only advances lengths keeps the
    shared runs and the buffers and rebuilds the (small) private indices."""

    groups: list[_SeqGroup]
    run_q_rows: torch.Tensor  # [num_runs, max_run_queries]: query rows of the sequences sharing each run
    run_q_valid: torch.Tensor
    run_kv_rows: torch.Tensor  # [num_runs, max_run_tokens]: K/V rows of each run of shared chunks
    run_kv_valid: torch.Tensor
    buffers: _Buffers
    run_span: tuple[int, int] | None  # (first K/V row, rows) when all shared chunks form one consecutive run

    def advance(self, plan: AttentionPlan) -> None:
        self.groups = _seq_groups(plan)

    @classmethod
    def build(cls, plan: AttentionPlan) -> _TorchWorkspace:
        t = plan.tensors
        dev = plan.device
        q_indptr = t.q_indptr
        num_new = q_indptr[1:] - q_indptr[:-1]
        runs = plan.shared_runs()
        run_indptr = [0] + [end for _, end in runs]
        run_seqs = [b for begin, _ in runs for b in plan.shared_users(begin)]
        run_seq_indptr = [0]
        for begin, _ in runs:
            run_seq_indptr.append(run_seq_indptr[-1] + len(plan.shared_users(begin)))
        run_indptr_t = torch.tensor(run_indptr, dtype=torch.int64, device=dev)
        run_kv_rows, _, run_kv_valid = pad_ranges(run_indptr_t, t.shared_kv_begin, t.shared_len)
        run_seqs_t = torch.tensor(run_seqs, dtype=torch.int64, device=dev)
        run_q_rows, _, run_q_valid = pad_ranges(
            torch.tensor(run_seq_indptr, dtype=torch.int64, device=dev), q_indptr[run_seqs_t], num_new[run_seqs_t]
        )
        return cls(_seq_groups(plan), run_q_rows, run_q_valid, run_kv_rows, run_kv_valid, _Buffers(),
                   _single_span(plan, run_indptr))


def _single_span(plan: AttentionPlan, run_indptr: list[int]) -> tuple[int, int] | None:
    """(first row, rows) if there is exactly one run and its chunks lie back to back in the storage."""
    begin, length = plan.shared_kv_begin, plan.shared_len
    if len(run_indptr) != 2 or any(begin[j + 1] != begin[j] + length[j] for j in range(len(begin) - 1)):
        return None
    return begin[0], sum(length)


def _fold_queries(q: torch.Tensor, rows: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q: [N, Hq, d], rows: [G, R] -> [Hkv, G, R * group, d] (row r, head j -> r * group + j % group)."""
    num_groups, width = rows.shape
    _, num_q_heads, d = q.shape
    group = num_q_heads // num_kv_heads
    x = q.index_select(0, rows.reshape(-1)).view(num_groups, width, num_kv_heads, group, d)
    return x.permute(2, 0, 1, 3, 4).reshape(num_kv_heads, num_groups, width * group, d)


def _unfold_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """[Hkv, G, R * group, ...] -> [G * R, Hkv * group, ...], inverse of ``_fold_queries``'s layout."""
    num_kv_heads, num_groups, rg = x.shape[:3]
    group = rg // width
    rest = x.shape[3:]
    x = x.reshape(num_kv_heads, num_groups, width, group, *rest).movedim(0, 2)
    return x.reshape(num_groups * width, num_kv_heads * group, *rest)


def _partial(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, masked: torch.Tensor | None,
    bufs: _Buffers, span: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One softmax partial per query row over the gathered keys.

    q: [Hkv, G, M, d] float32, already scaled; k, v: [T, Hkv, d] (one layer's storage); rows: [G, L] K/V rows
    per group; masked: [G, 1 or M, L] True where a key must be ignored (None: none is); span: (first row,
    count) when there is one group and its rows are consecutive.
    Returns o: [Hkv, G, M, d] (unnormalised), l, m: [Hkv, G, M] (sum of exp and max of the scores).
    """
    num_kv_heads, num_groups, num_q, d = q.shape
    width = rows.shape[1]
    flat = rows.reshape(-1)

    head_rows: torch.Tensor | None = None

    def gather(t: torch.Tensor, which: str) -> torch.Tensor:
        """[Hkv, G, L, d] float32 that the matmuls take without hidden copies."""
        nonlocal head_rows
        shape = (num_kv_heads, num_groups, width, d)
        if span is not None:  # one group of consecutive rows: a view of the storage, nothing gathered
            picked = t[span[0] : span[0] + span[1]].permute(1, 0, 2).unsqueeze(1)  # strided [Hkv, 1, L, d]
            if t.dtype == torch.float32:
                return picked  # BLAS takes the row stride as is
            return bufs.get(f"{name}.{which}.f32", shape, torch.float32, t.device).copy_(picked)
        if head_rows is None:  # (row, head) pairs in [Hkv, G, L] order, as rows of t viewed [T * Hkv, d]
            heads = torch.arange(num_kv_heads, device=flat.device)
            head_rows = (flat[None, :] * num_kv_heads + heads[:, None]).reshape(-1)
        out = bufs.get(f"{name}.{which}", (head_rows.numel(), d), t.dtype, t.device)
        picked = torch.index_select(t.reshape(-1, d), 0, head_rows, out=out).view(shape)  # one pass, row memcpy
        if t.dtype == torch.float32:
            return picked
        return bufs.get(f"{name}.{which}.f32", shape, torch.float32, t.device).copy_(picked)

    keys, values = gather(k, "k"), gather(v, "v")
    s = torch.matmul(q, keys.transpose(-1, -2),
                     out=bufs.get(f"{name}.s", (num_kv_heads, num_groups, num_q, width), torch.float32, q.device))
    if masked is not None:
        s.masked_fill_(masked, float("-inf"))
    m = s.amax(dim=-1)  # [Hkv, G, M]
    s.sub_(torch.where(torch.isinf(m), torch.zeros_like(m), m).unsqueeze(-1)).exp_()
    return torch.matmul(s, values), s.sum(dim=-1), m


@torch.inference_mode()
def tpp_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-phase-partition attention of a batch.

    Parameters
    ----------
    q : ``[num_rows, num_q_heads, head_dim]``; k, v : ``[num_kv_rows, num_kv_heads, head_dim]`` (one layer).

    Returns ``out [num_rows, num_q_heads, head_dim]`` in ``q.dtype`` and ``lse [num_rows, num_q_heads]``
    float32 (natural log).
    """
    ws = plan.workspaces.get("torch")
    if not isinstance(ws, _TorchWorkspace):
        ws = _TorchWorkspace.build(plan)
        plan.workspaces["torch"] = ws
    num_rows, num_q_heads, d = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qf = q.float() * scale

    # Sequence-first: every sequence over its private chunks, causal by position.
    out = torch.empty(num_rows, num_q_heads, d, dtype=torch.float32, device=q.device)
    m_row = torch.empty(num_rows, num_q_heads, dtype=torch.float32, device=q.device)
    l_row = torch.empty_like(m_row)
    for i, g in enumerate(ws.groups):
        width = g.seq_rows.shape[1]
        qs = _fold_queries(qf, g.seq_rows, num_kv_heads)  # [Hkv, B, Qm * g, d]
        masked = None
        if g.needs_mask:
            q_pos = g.seq_row_pos.repeat_interleave(group, dim=1)  # [B, Qm * g]
            masked = ~g.priv_valid[:, None, :] | (g.priv_pos[:, None, :] > q_pos[:, :, None])  # [B, Qm * g, Lp]
        o, l_sum, m = _partial(f"private{i}", qs, k, v, g.priv_rows, masked, ws.buffers)
        keep = g.seq_row_valid.reshape(-1)
        rows = g.seq_rows.reshape(-1)[keep]
        out[rows] = _unfold_rows(o, width)[keep]
        m_row[rows] = _unfold_rows(m, width)[keep]
        l_row[rows] = _unfold_rows(l_sum, width)[keep]

    # Chunk-first: each run of shared chunks once, against all queries of the sequences sharing it.
    if plan.num_shared:
        width = ws.run_q_rows.shape[1]
        qr = _fold_queries(qf, ws.run_q_rows, num_kv_heads)  # [Hkv, S, R * g, d]
        masked = None if ws.run_span is not None else ~ws.run_kv_valid[:, None, :]  # [S, 1, C]
        o_s, l_s, m_s = _partial("shared", qr, k, v, ws.run_kv_rows, masked, ws.buffers, ws.run_span)
        keep = ws.run_q_valid.reshape(-1)
        rows_s = ws.run_q_rows.reshape(-1)[keep]
        o_s, l_s, m_s = (_unfold_rows(x, width)[keep] for x in (o_s, l_s, m_s))
        # Merge: m = max of all partials of a row; rescale each partial by exp(m_i - m) and add.
        m_all = m_row.scatter_reduce(0, rows_s[:, None].expand_as(m_s), m_s, "amax")
        a = torch.exp(m_row - m_all)
        b = torch.exp(m_s - m_all[rows_s])
        out = (out * a[..., None]).index_add_(0, rows_s, o_s * b[..., None])
        l_row = (l_row * a).index_add_(0, rows_s, l_s * b)
        m_row = m_all
    lse = m_row + torch.log(l_row)
    return (out / l_row[..., None]).to(q.dtype), lse


@register_backend
class TorchBackend(PlannedBackend):
    """Two-phase partition in vectorized PyTorch ops: runs wherever PyTorch does (the portable fallback)."""

    name = "torch"

    @classmethod
    def auto_priority(cls, device: torch.device) -> int | None:
        return 1

    def run(self, q: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        return tpp_attention(q, cache.k_cache[layer], cache.v_cache[layer], self.attention_plan, self.scale)
