"""Two-phase-partition attention in native CPU kernels (``chunkattn/csrc/tpp_cpu.cpp``), reading K/V in place.

The kernels are compiled on first use (see :mod:`chunkattn.native`); if that fails, the ``cpu`` backend is
unavailable and ``auto`` falls back to ``torch``.

Work decomposition, built once per plan (:class:`CpuWorkspace`) and kept while a decode plan advances:

* shared tasks: each run of shared chunks is cut into pieces of whole chunks (at least ``MIN_PIECE_TOKENS``,
  enough to keep every core busy) and the rows of its sequences into tiles of at most ``ROWS_PER_TASK`` query
  rows (tokens x GQA group; ``ROWS_PER_TASK_AMX`` for bfloat16 on AMX tiles); every (piece, row tile) x K/V
  head reads the piece's K/V once for all of those rows;
* private tasks: each sequence's new tokens in tiles, over its private chunks, causally masked, one K/V head
  per task; except a decode token with a small GQA group (<= ``WIDE_MAX_GROUP`` query heads per K/V head, at
  head size 64 ``WIDE_MAX_GROUP_D64``; any group up to ``WIDE_MAX_GROUP_AMX`` for bfloat16 on AMX tiles),
  whose "wide" task takes all heads at once so that each key's row (every head) is read once and in order
  (at d = 64 and 128: blocks of 16 keys that stay in L2 while each head passes over them, in registers; on
  AMX tiles the scores of several heads' rows in one tile and the values multiplied as stored),
  split over several tasks when its private list is long (flash-decoding);
* a row whose only contribution is its private task gets its output written directly; the others get one
  partial (o, m, l) slot per task and a merge pass combines them;
* on AMX tiles, a shared task whose rows are whole sequences that share only its keys (one piece) also runs
  those sequences' private tasks, each over its own tiles of rows, and writes their outputs directly: no
  partials, no merge (a prefill after a cached prompt: 31 x 64 tokens after 1024 shared keys spent ~15% of
  its attention writing and merging partials); only while those tasks number at least two per thread. A 16-row
  tile may hold two sequences' rows: the other's probabilities are exact zeros, so an inf in one sequence's
  values (a broken model) would make NaN in its tile neighbour's output too.

The kernel's inner products are register-blocked tiles over keys gathered in blocks of 128 across chunks. In
float32 on AVX-512 CPUs, a task of 16 or more query rows computes its scores transposed (12 keys x 32 rows, the
rows along the vector lanes, keys read as stored) and runs the softmax down the key axis 16 rows at a time;
other tasks pack each block of keys transposed (8 rows x 32 keys). Values: 6 rows x 64 dims at d = 64. bfloat16 uses
AVX512-BF16 dot products where the CPU has them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from chunkattn import native
from chunkattn.attention.backend import PlannedBackend, register_backend
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.cache.plan import AttentionPlan

ROWS_PER_TASK = 96  # query rows (tokens x group) one task multiplies at once: ~24 KB of fp32 queries at d=64
ROWS_PER_TASK_AMX = 384  # bfloat16 on AMX tiles: a task passes over a block 16 rows at a time, so more rows only
# share the block's transposed values (fewer tasks repack them); fewer while that leaves < 2 tasks per thread
MIN_PIECE_TOKENS = 1024  # shared keys one task sweeps at least (each task packs its rows' queries, writes and
# merges their partials: below ~1K keys that cost more than the balance it bought, e.g. 32 sequences decoding
# after a 1K-token prompt took 15% longer with 256 on a 2-core Xeon with AMX)
MIN_SPLIT_TOKENS = 256  # private keys of one split of a long decode list (flash-decoding over the threads)
TASKS_PER_THREAD = 8  # shared (and split decode) tasks per thread to aim for
FUSE_PRIVATE = True  # AMX: shared tasks of whole sequences run their private tasks (off: for A/B runs)
WIDE_MAX_GROUP = 3  # decode tokens with at most this many query heads per K/V head run all heads in one task
WIDE_MAX_GROUP_D64 = 4  # ... at head_dim 64: Llama-3.2-1B's 32 / 8 heads too (see CpuWorkspace.build)
WIDE_MAX_GROUP_AMX = 16  # ... every group the AMX wide task takes (bf16 on AMX tiles)
log = logging.getLogger(__name__)


def kernels_available() -> bool:
    """Whether the native CPU kernels are compiled and loaded (compiling them on the first call)."""
    return native.available()


def amx_active(head_dim: int) -> bool:
    """Whether bfloat16 tasks of this head size run on AMX tiles here (the kernels built for a CPU with AMX, tile
    state granted, not switched off by ``chunkattn_cpu.set_amx``, a head size the tiles take)."""
    load_kernels()
    return bool(torch.ops.chunkattn_cpu.amx_for_head_dim(head_dim))


def load_kernels() -> None:
    """Compile (once per machine) and load the kernels; raises ``KernelBuildError`` with the reason."""
    native.load()


def _i64(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@dataclass
class CpuWorkspace:
    """Task lists (int64 tensors) and partial buffers of one plan, for given head counts and head size."""

    idx: list[torch.Tensor]  # the 26 index tensors the kernel takes, in its order
    o_part: torch.Tensor  # [num_slots, num_q_heads, head_dim] float32
    ml_part: torch.Tensor  # [num_slots, num_q_heads, 2] float32: (max, sum of exp) in base 2
    num_shared_tasks: int
    num_private_tasks: int
    num_wide_tasks: int
    num_fused_tasks: int = 0  # private tasks run inside a shared task (included in num_private_tasks)

    def advance(self, plan: AttentionPlan) -> None:
        """Nothing to do: lengths and positions live in the plan's tensors, which advance in place."""

    @classmethod
    def build(cls, plan: AttentionPlan, num_q_heads: int, num_kv_heads: int, head_dim: int,
              threads: int | None = None, amx: bool = False) -> CpuWorkspace:
        """``amx``: bfloat16 tasks run on AMX tiles (:func:`amx_active`), which take more rows per task."""
        group = num_q_heads // num_kv_heads
        threads = threads or torch.get_num_threads()
        rows_per_task = ROWS_PER_TASK
        if amx:
            total = plan.num_rows * group
            rows_per_task = ROWS_PER_TASK_AMX
            while rows_per_task > ROWS_PER_TASK and math.ceil(total / rows_per_task) * num_kv_heads < 2 * threads:
                rows_per_task //= 2
        tile = max(1, rows_per_task // group)  # tokens per task
        qi = plan.q_indptr
        pi = plan.private_indptr
        slots = 0
        row_slots: list[list[int]] = [[] for _ in range(plan.num_rows)]
        # A decode token whose heads each have fewer rows than the packed-key path takes (group < 4) gets "wide"
        # tasks: all heads at once, reading each key's row of every head in order; long private lists are
        # split (flash-decoding) so that few sequences still keep every core busy. Other tiles get per-head
        # private tasks. A row gets a partial slot when anything else also writes to it.
        # At d = 64 a group of 4 too: per-head tasks of 4 rows padded a 16-row AMX tile and read each head's
        # 128 bytes of a key's row 1 KB apart, where a wide task streams whole rows. Measured on the AMX Xeon VM
        # (bf16, 32 / 8 heads, 32 sequences after 1024 shared tokens, alternated 3x): 64 private tokens, one
        # layer in cache 0.95-0.98x the time; 84, 16 layers in turn 0.87-0.93x; float32 0.95-1.0x and 0.90-0.95x;
        # at d = 128 (no bf16 value product for 4 heads in registers) 1.16x: not there.
        # On AMX tiles the wide task multiplies on tiles too (run_wide_amx), and every group goes wide: same VM,
        # one layer in cache, against per-head AMX tasks: Llama-3.1-8B's 32 / 8 heads at d = 128, 32 sequences
        # of 1024 own keys 0.55x the time, after a 1024-token shared prompt 0.81-0.83x; 64 / 8 heads 0.55x and
        # 0.96x; one 3000-key sequence 0.65x.
        max_group = WIDE_MAX_GROUP_AMX if amx else WIDE_MAX_GROUP_D64 if head_dim == 64 else WIDE_MAX_GROUP
        wide_seqs = [b for b in range(plan.num_seqs) if qi[b + 1] - qi[b] == 1 and group <= max_group
                     and pi[b + 1] > pi[b]]
        wide = set(wide_seqs)
        # shared tasks
        st: dict[str, list[int]] = {k: [] for k in ("chunk_begin", "chunk_end", "row_begin", "row_end", "slot")}
        st_rows: list[int] = []
        runs = plan.shared_runs()
        shared_tokens = sum(plan.shared_len)
        runs_of: dict[int, int] = {}  # sequence -> how many shared runs it reads
        for begin, _ in runs:
            for b in plan.shared_users(begin):
                runs_of[b] = runs_of.get(b, 0) + 1
        fused: list[tuple[int, list[int]]] = []  # (shared task, the sequences whose private tasks it runs)
        for begin, end in runs:
            users = plan.shared_users(begin)
            run_tokens = sum(plan.shared_len[begin:end])
            if amx:
                row_tiles, tile_seqs = _sequence_tiles(users, qi, tile)
            else:
                rows = [r for b in users for r in range(qi[b], qi[b + 1])]
                row_tiles = [rows[i : i + tile] for i in range(0, len(rows), tile)]
                tile_seqs = [None] * len(row_tiles)
            # enough pieces for ~8 tasks per thread over all runs and heads (threads then finish within a
            # small task of each other), each >= MIN_PIECE_TOKENS keys
            want = math.ceil(TASKS_PER_THREAD * threads * run_tokens / max(1, shared_tokens)
                             / (num_kv_heads * len(row_tiles)))
            pieces = max(1, min(end - begin, want, run_tokens // MIN_PIECE_TOKENS or 1))
            bounds = [begin + (end - begin) * i // pieces for i in range(pieces + 1)]
            # fusing takes the private tasks' work into these tasks: only while they still keep every thread busy
            spread = len(row_tiles) * num_kv_heads >= 2 * threads
            for c0, c1 in zip(bounds, bounds[1:]):
                for tile_rows, seqs in zip(row_tiles, tile_seqs):
                    st["chunk_begin"].append(c0)
                    st["chunk_end"].append(c1)
                    st["row_begin"].append(len(st_rows))
                    st_rows.extend(tile_rows)
                    st["row_end"].append(len(st_rows))
                    if (FUSE_PRIVATE and pieces == 1 and seqs is not None and spread
                            and all(runs_of[b] == 1 and b not in wide for b in seqs)):
                        st["slot"].append(-1)  # complete rows: the output directly
                        fused.append((len(st["slot"]) - 1, seqs))
                        continue
                    st["slot"].append(slots)
                    for i, r in enumerate(tile_rows):
                        row_slots[r].append(slots + i)
                    slots += len(tile_rows)
        wt: dict[str, list[int]] = {k: [] for k in ("row", "chunk_begin", "chunk_end", "slot")}
        want = math.ceil(TASKS_PER_THREAD * threads / max(1, len(wide_seqs)))
        for b in wide_seqs:
            r, chunks = qi[b], pi[b + 1] - pi[b]
            splits = max(1, min(chunks, want, sum(plan.private_len[pi[b] : pi[b + 1]]) // MIN_SPLIT_TOKENS or 1))
            bounds = [pi[b] + chunks * i // splits for i in range(splits + 1)]
            for c0, c1 in zip(bounds, bounds[1:]):
                wt["row"].append(r)
                wt["chunk_begin"].append(c0)
                wt["chunk_end"].append(c1)
                if splits > 1 or row_slots[r]:
                    wt["slot"].append(slots)
                    row_slots[r].append(slots)
                    slots += 1
                else:
                    wt["slot"].append(-1)
        pt: dict[str, list[int]] = {k: [] for k in ("row_begin", "row_end", "chunk_begin", "chunk_end", "slot")}
        fused_seqs = {b for _, seqs in fused for b in seqs}
        for b in range(plan.num_seqs):
            if b in wide or b in fused_seqs:
                continue
            # a prefill's later tiles attend to more keys: largest first, so the last tasks are short
            for r0 in reversed(range(qi[b], qi[b + 1], tile)):
                r1 = min(qi[b + 1], r0 + tile)
                pt["row_begin"].append(r0)
                pt["row_end"].append(r1)
                pt["chunk_begin"].append(pi[b])
                pt["chunk_end"].append(pi[b + 1])
                if any(row_slots[r] for r in range(r0, r1)):
                    pt["slot"].append(slots)
                    for r in range(r0, r1):
                        row_slots[r].append(slots + r - r0)
                    slots += r1 - r0
                else:
                    pt["slot"].append(-1)
        # the fused private tasks, last: shared task i runs st_fused[i] (a range of them) after its shared keys
        fused_begin, fused_end = [0] * len(st["slot"]), [0] * len(st["slot"])
        for task, seqs in fused:
            fused_begin[task] = len(pt["slot"])
            for b in seqs:
                if pi[b + 1] > pi[b]:
                    pt["row_begin"].append(qi[b])
                    pt["row_end"].append(qi[b + 1])
                    pt["chunk_begin"].append(pi[b])
                    pt["chunk_end"].append(pi[b + 1])
                    pt["slot"].append(-1)
            fused_end[task] = len(pt["slot"])
        dev = plan.device
        t = plan.tensors
        merge = any(row_slots)
        indptr = [0]
        for s in row_slots:
            indptr.append(indptr[-1] + len(s))
        idx = [t.q_pos, t.private_indptr, t.private_kv_begin, t.private_len, t.private_pos, t.shared_kv_begin,
               t.shared_len,
               *(_i64(pt[k], dev) for k in ("row_begin", "row_end", "chunk_begin", "chunk_end", "slot")),
               *(_i64(st[k], dev) for k in ("chunk_begin", "chunk_end", "row_begin", "row_end", "slot")),
               _i64(st_rows, dev),
               _i64(indptr if merge else [], dev), _i64([s for ss in row_slots for s in ss] if merge else [], dev),
               *(_i64(wt[k], dev) for k in ("row", "chunk_begin", "chunk_end", "slot")),
               _i64(fused_begin, dev), _i64(fused_end, dev)]
        return cls(idx=idx,
                   o_part=torch.empty(max(1, slots), num_q_heads, head_dim, dtype=torch.float32, device=dev),
                   ml_part=torch.empty(max(1, slots), num_q_heads, 2, dtype=torch.float32, device=dev),
                   num_shared_tasks=len(st["slot"]), num_private_tasks=len(pt["slot"]),
                   num_wide_tasks=len(wt["slot"]), num_fused_tasks=sum(e - b for b, e in zip(fused_begin, fused_end)))


def _sequence_tiles(users: list[int], qi: list[int], tile: int) -> tuple[list[list[int]], list[list[int] | None]]:
    """The rows (tokens) of a shared run's users in tiles of at most ``tile``: whole sequences packed in order, a
    sequence longer than a tile in tiles of its own. Returns the tiles and, per tile, the sequences it holds
    wholly (None for the tiles of a split sequence)."""
    tiles: list[list[int]] = []
    seqs: list[list[int] | None] = []
    rows: list[int] = []
    held: list[int] = []
    for b in users:
        n = qi[b + 1] - qi[b]
        if n == 0:
            continue
        if rows and (len(rows) + n > tile):
            tiles.append(rows)
            seqs.append(held)
            rows, held = [], []
        if n > tile:
            for r0 in range(qi[b], qi[b + 1], tile):
                tiles.append(list(range(r0, min(qi[b + 1], r0 + tile))))
                seqs.append(None)
            continue
        rows.extend(range(qi[b], qi[b + 1]))
        held.append(b)
    if rows:
        tiles.append(rows)
        seqs.append(held)
    return tiles, seqs


def plan_workspace(plan: AttentionPlan, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
                   ) -> CpuWorkspace:
    """The kernel's workspace for ``plan`` at these head counts and dtype, built on first use and kept in
    ``plan.workspaces`` (every layer of a step, and the steps a decode plan advances over, share it)."""
    load_kernels()
    key = f"cpu:{num_q_heads}:{num_kv_heads}:{head_dim}"
    ws = plan.workspaces.get(key)
    if not isinstance(ws, CpuWorkspace):
        ws = CpuWorkspace.build(plan, num_q_heads, num_kv_heads, head_dim,
                                amx=dtype == torch.bfloat16 and amx_active(head_dim))
        plan.workspaces[key] = ws
    return ws


def cpu_tpp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-phase-partition attention with the native CPU kernels.

    Parameters
    ----------
    q : ``[num_rows, num_q_heads, head_dim]`` (rows may be strided; head_dim contiguous);
    k, v : ``[num_kv_rows, num_kv_heads, head_dim]`` one layer's storage; float32 or bfloat16 like ``q``.

    Returns ``out [num_rows, num_q_heads, head_dim]`` in ``q.dtype`` and ``lse [num_rows, num_q_heads]``
    float32 (natural log).
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    ws = plan_workspace(plan, num_q_heads, num_kv_heads, head_dim, q.dtype)
    out = torch.empty(num_rows, num_q_heads, head_dim, dtype=q.dtype)
    lse = torch.empty(num_rows, num_q_heads, dtype=torch.float32)
    torch.ops.chunkattn_cpu.tpp(q, k, v, out, lse, ws.o_part, ws.ml_part, ws.idx, scale,
                                num_q_heads // num_kv_heads)
    return out, lse


@register_backend
class CpuBackend(PlannedBackend):
    """Two-phase partition in native CPU kernels (float32, bfloat16): the fastest CPU path."""

    name = "cpu"

    @classmethod
    def auto_priority(cls, device: torch.device) -> int | None:
        return 5 if device.type == "cpu" and kernels_available() else None

    def __init__(self, cache: PrefixKVCache, scale: float | None = None):
        super().__init__(cache, scale)
        if cache.device.type != "cpu":
            raise ValueError(f"the cpu backend runs on CPU caches, this one is on {cache.device}")
        if cache.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the cpu backend supports float32 and bfloat16 caches, not {cache.dtype}")
        load_kernels()

    def run(self, q: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        return cpu_tpp_attention(q, cache.k_cache[layer], cache.v_cache[layer], self.attention_plan, self.scale)
