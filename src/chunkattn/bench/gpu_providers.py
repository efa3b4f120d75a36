"""GPU providers of the kernel benchmark: our Triton kernels, SDPA's flash backend, and FlashInfer's paged
decode and cascade kernels when ``flashinfer`` is importable. Each raises ``ProviderUnavailable`` (noted in the
results, not fatal) where it cannot run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

import chunkattn
from chunkattn.bench.workload import Provider, ProviderUnavailable, Workload
from chunkattn.cache.plan import AttentionPlan

RunFn = Callable[[], torch.Tensor]


def _unavailable(why: str) -> Exception:
    return ProviderUnavailable(why)


def _need_cuda(w: Workload) -> None:
    if w.q.device.type != "cuda":
        raise _unavailable("needs --device cuda")


def _tpp_triton(w: Workload) -> tuple[RunFn, int]:
    _need_cuda(w)

    def run() -> torch.Tensor:
        return chunkattn.attention(w.q, w.cache, w.batch, 0, backend="triton")

    return run, w.cache.stats()["kv_bytes"]


def _paged_triton(w: Workload) -> tuple[RunFn, int]:
    """The same kernels with sharing off: every sequence reads every one of its chunks (PagedAttention-like)."""
    _need_cuda(w)
    from chunkattn.attention.triton_tpp import triton_attention

    plan = AttentionPlan.build(w.batch, w.cache.tree.version, w.cache.chunk_size, w.cache.device, share=False)
    k, v = w.cache.k_cache[0], w.cache.v_cache[0]
    scale = w.config.head_dim**-0.5

    def run() -> torch.Tensor:
        return triton_attention(w.q, k, v, plan, scale)[0]

    return run, w.cache.stats()["kv_bytes"]


def _page_tables(w: Workload) -> tuple[list[list[int]], list[int]]:
    """Each sequence's pages (slots) and last-page length; FlashInfer needs chunks that start their slot."""
    c = w.cache.chunk_size
    pages, last_len = [], []
    for seq in w.batch.seqs:
        path = seq._end.path()
        for i, node in enumerate(path):
            if node.start != 0 or (i < len(path) - 1 and len(node) != c):
                raise _unavailable("FlashInfer's page table needs prompts that end on chunk boundaries")
        pages.append([n.slot for n in path])
        last_len.append(len(path[-1]))
    return pages, last_len


def _flashinfer(w: Workload) -> Any:
    _need_cuda(w)
    if importlib.util.find_spec("flashinfer") is None:
        raise _unavailable("flashinfer is not importable (see benchmarks/gpu_check.sh for carrying its wheel)")
    import flashinfer

    return flashinfer


def _i32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _paged_kv(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    c = w.cache.chunk_size
    shape = (w.cache.num_slots, c, w.config.kv_heads, w.config.head_dim)  # NHD pages
    return w.cache.k_cache[0].view(shape), w.cache.v_cache[0].view(shape)


def _flashinfer_paged(w: Workload) -> tuple[RunFn, int]:
    fi = _flashinfer(w)
    pages, last_len = _page_tables(w)
    dev, cfg = w.q.device, w.config
    indptr = [0]
    for p in pages:
        indptr.append(indptr[-1] + len(p))
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=cfg.heads != cfg.kv_heads)
    try:
        wrapper.plan(_i32(indptr, dev), _i32([s for p in pages for s in p], dev), _i32(last_len, dev),
                     cfg.heads, cfg.kv_heads, cfg.head_dim, w.cache.chunk_size,
                     q_data_type=w.q.dtype, kv_data_type=w.q.dtype)
    except Exception as exc:  # noqa: BLE001 - any FlashInfer failure is reported, not fatal
        raise _unavailable(f"flashinfer decode plan failed: {exc}") from exc
    kv = _paged_kv(w)

    def run() -> torch.Tensor:
        return wrapper.run(w.q, kv)

    return run, w.cache.stats()["kv_bytes"]


def _flashinfer_cascade(w: Workload) -> tuple[RunFn, int]:
    """Two levels: the shared prefix for all queries at once (prefill wrapper, fa2), then each sequence's own
    pages (decode wrapper), merged with ``merge_state``."""
    fi = _flashinfer(w)
    pages, last_len = _page_tables(w)
    dev, cfg = w.q.device, w.config
    c = w.cache.chunk_size
    shared = cfg.shared // c if cfg.batch > 1 else 0
    if shared == 0 or any(p[:shared] != pages[0][:shared] for p in pages):
        raise _unavailable("cascade needs one chunk-aligned prefix shared by every sequence")
    unique = [p[shared:] for p in pages]
    if any(not u for u in unique):
        raise _unavailable("cascade needs private tokens after the shared prefix")
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    try:
        prefix = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        prefix.plan(_i32([0, cfg.batch], dev), _i32([0, shared], dev), _i32(pages[0][:shared], dev),
                    _i32([c], dev), cfg.heads, cfg.kv_heads, cfg.head_dim, c, causal=False,
                    q_data_type=w.q.dtype, kv_data_type=w.q.dtype)
        suffix = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev),
                                                       "NHD", use_tensor_cores=cfg.heads != cfg.kv_heads)
        indptr = [0]
        for u in unique:
            indptr.append(indptr[-1] + len(u))
        suffix.plan(_i32(indptr, dev), _i32([s for u in unique for s in u], dev), _i32(last_len, dev),
                    cfg.heads, cfg.kv_heads, cfg.head_dim, c, q_data_type=w.q.dtype, kv_data_type=w.q.dtype)
    except Exception as exc:  # noqa: BLE001
        raise _unavailable(f"flashinfer cascade plan failed: {exc}") from exc
    kv = _paged_kv(w)

    def run() -> torch.Tensor:
        o1, s1 = prefix.run(w.q, kv, return_lse=True)
        o2, s2 = suffix.run(w.q, kv, return_lse=True)
        return fi.merge_state(o1, s1, o2, s2)[0]

    return run, w.cache.stats()["kv_bytes"]


def providers(sdpa: Callable[..., tuple[RunFn, int]]) -> dict[str, Provider]:
    def sdpa_flash(w: Workload) -> tuple[RunFn, int]:
        _need_cuda(w)
        if w.q.dtype == torch.float32:
            raise _unavailable("SDPA's flash backend needs fp16/bf16")
        return sdpa(w, flash=True)

    return {
        "tpp-triton": _tpp_triton,
        "paged-triton": _paged_triton,
        "sdpa-flash": sdpa_flash,
        "flashinfer-paged": _flashinfer_paged,
        "flashinfer-cascade": _flashinfer_cascade,
    }
