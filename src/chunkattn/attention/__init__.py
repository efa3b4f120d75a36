"""Attention over a :class:`~chunkattn.PrefixKVCache`: one public function, several backends.

Backends: ``reference`` (per-sequence float64 oracle), ``torch`` (vectorized two-phase partition, CPU or
CUDA), ``triton`` (GPU kernels; also runs in Triton's CPU interpreter), ``auto`` (triton on CUDA tensors when
Triton is importable, else torch).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal, overload

import torch

from chunkattn.attention.reference import reference_attention
from chunkattn.attention.torch_tpp import tpp_attention
from chunkattn.cache.cache import Batch, PrefixKVCache

BACKENDS = ("auto", "reference", "torch", "triton")
Backend = Literal["auto", "reference", "torch", "triton"]


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return backend


@overload
def attention(q: torch.Tensor, cache: PrefixKVCache, batch: Batch, layer: int, *, backend: Backend = ...,
              scale: float | None = ..., return_lse: Literal[False] = ...) -> torch.Tensor: ...
@overload
def attention(q: torch.Tensor, cache: PrefixKVCache, batch: Batch, layer: int, *, backend: Backend = ...,
              scale: float | None = ..., return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention(
    q: torch.Tensor,
    cache: PrefixKVCache,
    batch: Batch,
    layer: int,
    *,
    backend: Backend = "auto",
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a batch's new tokens over their sequences in the cache.

    Each new token attends to every earlier token of its own sequence (cached prefix, shared chunks and
    earlier new tokens) and to itself. Store the layer's K/V of the new tokens with ``cache.store`` first.

    Parameters
    ----------
    q : torch.Tensor
        ``[batch.num_new_tokens, num_q_heads, head_dim]``, rows in the order of ``cache.extend``; the cache's
        dtype and device. ``num_q_heads`` must be a multiple of ``cache.num_kv_heads`` (GQA/MQA: query head
        ``h`` reads K/V head ``h // (num_q_heads // num_kv_heads)``).
    cache, batch, layer
        The cache, the batch returned by its latest ``extend`` for these sequences, the layer index.
    backend : {"auto", "reference", "torch", "triton"}
    scale : float, optional
        Score scale; default ``1 / sqrt(head_dim)``.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores, ``[num_new_tokens, num_q_heads]`` float32, in
        natural log (base e).

    Returns
    -------
    out : ``[batch.num_new_tokens, num_q_heads, head_dim]`` in ``q.dtype``; and ``lse`` if asked.
    """
    if not isinstance(cache, PrefixKVCache):
        raise TypeError(f"cache must be a PrefixKVCache, got {type(cache).__name__}")
    layer = cache._check_layer(layer)
    cache.check_batch(batch)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3 or q.shape[0] != batch.num_new_tokens or q.shape[2] != cache.head_dim:
        raise ValueError(f"q must be [num_new_tokens={batch.num_new_tokens}, num_q_heads, "
                         f"head_dim={cache.head_dim}], got {list(q.shape)}")
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({cache.num_kv_heads})")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must be {cache.dtype} like the cache, got {q.dtype}")
    if q.device != cache.k_cache.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.k_cache.device}")
    scale = 1.0 / math.sqrt(cache.head_dim) if scale is None else float(scale)
    k, v = cache.k_cache[layer], cache.v_cache[layer]
    name = resolve_backend(backend, q.device)
    if name == "reference":
        rows = [cache.sequence_kv_rows(s) for s in batch.seqs]
        out, lse = reference_attention(q, k, v, rows, batch.q_indptr, scale)
    elif name == "torch":
        out, lse = tpp_attention(q, k, v, cache.plan(batch), scale)
    else:
        from chunkattn.attention.triton_tpp import triton_attention

        out, lse = triton_attention(q, k, v, cache.plan(batch), scale)
    return (out, lse) if return_lse else out


__all__ = ["BACKENDS", "attention", "reference_attention", "resolve_backend", "tpp_attention"]
