"""``KVPool``: the K/V storage of a :class:`~chunkattn.cache.cache.PrefixKVCache`, apart from its tree.

The tree (``cache/tree.py``) decides which chunk slot holds which tokens; the pool holds their keys and values,
one ``[num_slots * chunk_size, num_kv_heads, head_dim]`` tensor per layer for K and one for V (row
``slot * chunk_size + i`` is token ``i`` of the slot), and writes new tokens' K/V to the rows the tree chose.
It knows nothing of sequences or prefixes: the cache validates a batch, then hands the pool row indices.
"""

from __future__ import annotations

import importlib.util

import torch

from chunkattn.errors import InsufficientMemoryError
from chunkattn.utils import memory_shortfall

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_pool_fits(num_layers: int, num_slots: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`~chunkattn.errors.InsufficientMemoryError` if the pool would take more than
    :data:`~chunkattn.utils.MEMORY_FRACTION` of the memory ``device`` has available, naming its size and how many
    tokens fit."""
    token_bytes = 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize
    need = token_bytes * num_slots * chunk_size
    short = memory_shortfall(need, device, "the pool")
    if short is None:
        return
    why, budget = short
    raise InsufficientMemoryError(
        f"a K/V pool of {num_slots * chunk_size} tokens needs {need / 1024**3:.1f} GiB ({token_bytes} bytes a token: "
        f"{num_layers} layers x {num_kv_heads} K/V heads x head dim {head_dim} x K and V x {dtype.itemsize} bytes), "
        f"but {why}: lower the pool's size (kv_cache_tokens, --kv-cache-tokens) to at most "
        f"{budget // token_bytes // chunk_size * chunk_size} tokens")


class KVPool:
    """Per-layer K and V storage for ``num_slots`` chunks of ``chunk_size`` tokens, zero-filled."""

    def __init__(self, num_layers: int, num_slots: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.chunk_size = chunk_size
        self.dtype = dtype
        check_pool_fits(num_layers, num_slots, chunk_size, num_kv_heads, head_dim, dtype, device)
        # k, v: [num_layers, num_slots * chunk_size, num_kv_heads, head_dim]
        self.k = torch.zeros(num_layers, num_slots * chunk_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.device = self.k.device
        # write() scatters with a Triton kernel on CUDA (head_dim a power of two), with the native row copy on the
        # CPU (decided at the first write: it builds the native kernels), with index_copy_ elsewhere.
        self._triton_store = (self.device.type == "cuda" and head_dim & (head_dim - 1) == 0
                              and importlib.util.find_spec("triton") is not None)
        self._native_store: bool | None = None if self.device.type == "cpu" else False

    @property
    def chunk_bytes(self) -> int:
        """K+V bytes of one chunk across all layers."""
        return 2 * self.num_layers * self.chunk_size * self.num_kv_heads * self.head_dim * self.k.element_size()

    def check_layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def check_kv(self, k: object, v: object, num_tokens: int) -> None:
        """Raise unless ``k`` and ``v`` are ``[num_tokens, num_kv_heads, head_dim]`` tensors of the pool's
        dtype on its device."""
        shape = (num_tokens, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be [num_new_tokens, num_kv_heads, head_dim] = {list(shape)}, "
                                 f"got {list(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} must be {self.dtype} like the cache, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor,
              all_rows: bool) -> None:
        """``K[layer][dst_rows[j]] = k[src_rows[j]]`` (and V) for every j; ``all_rows``: ``src_rows`` is every
        row of ``k`` in order (no gather needed). Not validated: the caller checked the batch."""
        if not dst_rows.numel():
            return
        if self._triton_store:  # one launch for K and V, no intermediate copy
            from chunkattn.cache.triton_store import triton_store

            triton_store(self.k[layer], self.v[layer], k, v, src_rows, dst_rows)
            return
        if self._native_store is None:
            from chunkattn import native

            self._native_store = native.available()
        if self._native_store and all(t.stride(2) == 1 and t.stride(1) == self.head_dim for t in (k, v)):
            torch.ops.chunkattn_layers.store_kv_(self.k[layer], self.v[layer], k, v, dst_rows.contiguous(),
                                                 None if all_rows else src_rows.contiguous())
            return
        if not all_rows:
            k = k.index_select(0, src_rows)
            v = v.index_select(0, src_rows)
        self.k[layer].index_copy_(0, dst_rows, k)
        self.v[layer].index_copy_(0, dst_rows, v)
