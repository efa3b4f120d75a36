"""Attention over a :class:`~chunkattn.PrefixKVCache`: one public function, several backends.

Backends: ``reference`` (per-sequence float64 oracle), ``torch`` (vectorized two-phase partition, CPU or
CUDA), ``triton`` (GPU kernels; also runs in Triton's CPU interpreter), ``auto`` (triton on CUDA tensors when
Triton is importable, else torch).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

# Importing a backend's module registers it.
from chunkattn.attention import cpu_tpp as _cpu_tpp
from chunkattn.attention import reference as _reference
from chunkattn.attention import torch_tpp as _torch_tpp
from chunkattn.attention import triton_backend as _triton_backend
from chunkattn.attention.backend import (
    AttentionBackend,
    PlannedBackend,
    backend_names,
    get_backend,
    register_backend,
    resolve_backend,
)
from chunkattn.attention.reference import reference_attention
from chunkattn.attention.torch_tpp import tpp_attention
from chunkattn.cache.cache import Batch, PrefixKVCache

del _cpu_tpp, _reference, _torch_tpp, _triton_backend

Backend = str  # a registered backend name or "auto" (see backend_names())


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
    """Causal attention of a batch's new tokens over their sequences in the cache (one call, checked).

    Each new token attends to every earlier token of its own sequence (cached prefix, shared chunks and
    earlier new tokens) and to itself. Store the layer's K/V of the new tokens with ``cache.store`` first.
    Every call validates its arguments; an engine plans once per step with an :class:`AttentionBackend`
    (``get_backend(name, cache).plan(batch)``) and then runs each layer without re-validation.

    Parameters
    ----------
    q : torch.Tensor
        ``[batch.num_new_tokens, num_q_heads, head_dim]``, rows in the order of ``cache.extend``; the cache's
        dtype and device. ``num_q_heads`` must be a multiple of ``cache.num_kv_heads`` (GQA/MQA: query head
        ``h`` reads K/V head ``h // (num_q_heads // num_kv_heads)``).
    cache, batch, layer
        The cache, the batch returned by its latest ``extend`` for these sequences, the layer index.
    backend : str
        A name from :func:`backend_names` (``"reference"``, ``"torch"``, ``"triton"``, ...) or ``"auto"``.
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
    layer = cache.pool.check_layer(layer)
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
    impl = get_backend(backend, cache, scale)
    with torch.inference_mode():
        impl.plan(batch)
        out, lse = impl.run(q, layer)
    return (out, lse) if return_lse else out


__all__ = ["AttentionBackend", "Backend", "PlannedBackend", "attention", "backend_names", "get_backend",
           "reference_attention", "register_backend", "resolve_backend", "tpp_attention"]
