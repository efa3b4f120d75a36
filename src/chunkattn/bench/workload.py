"""What the kernel benchmark's providers share: the sweep point (:class:`Config`), the filled cache and query of
one decode step (:class:`Workload`, :func:`build_workload`), the provider type and :class:`ProviderUnavailable`.
Its own module so that ``bench.kernel`` and ``bench.gpu_providers`` both import it, not each other."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import chunkattn
from chunkattn import PrefixKVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

@dataclass(frozen=True)
class Config:
    batch: int
    shared: int  # n_s: tokens of the common prompt
    private: int  # n_c: tokens of each sequence's own, the decode token included
    heads: int
    kv_heads: int
    head_dim: int
    chunk_size: int
    dtype: str
    device: str

    def __post_init__(self) -> None:
        if self.kv_heads == 0:  # 0 = as many as query heads (no GQA)
            object.__setattr__(self, "kv_heads", self.heads)
        if self.private < 1:
            raise ValueError("--private must be >= 1 (it includes the decoded token)")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype}")


@dataclass
class Workload:
    """One decode step on a filled cache, plus the same K/V laid out densely per sequence."""

    config: Config
    cache: PrefixKVCache
    batch: chunkattn.Batch
    q: torch.Tensor  # [B, H, d]
    dense_k: torch.Tensor | None  # [B, Hkv, L, d], built on demand by dense providers
    dense_v: torch.Tensor | None

    @property
    def seq_len(self) -> int:
        return self.config.shared + self.config.private

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dense_k is None or self.dense_v is None:
            rows = torch.stack([self.cache.sequence_kv_rows(s) for s in self.batch.seqs]).to(self.q.device)
            # [B, L, Hkv, d] -> [B, Hkv, L, d]
            self.dense_k = self.cache.k_cache[0][rows].transpose(1, 2).contiguous()
            self.dense_v = self.cache.v_cache[0][rows].transpose(1, 2).contiguous()
        return self.dense_k, self.dense_v

    def dense_kv_bytes(self) -> int:
        c = self.config
        return 2 * c.batch * self.seq_len * c.kv_heads * c.head_dim * DTYPES[c.dtype].itemsize

    def unique_kv_bytes(self) -> int:
        """The fewest K/V bytes one decode step must read: every distinct token once."""
        c = self.config
        tokens = c.shared + c.batch * c.private
        return 2 * tokens * c.kv_heads * c.head_dim * DTYPES[c.dtype].itemsize


def build_workload(config: Config, seed: int = 0) -> Workload:
    """Fill a one-layer cache: a shared prompt, then each sequence's own tokens, then one decode step."""
    c = config
    dtype, device = DTYPES[c.dtype], torch.device(c.device)
    gen = torch.Generator().manual_seed(seed)
    per_seq_chunks = math.ceil((c.private + c.chunk_size) / c.chunk_size)
    max_tokens = (math.ceil(c.shared / c.chunk_size) + 1 + c.batch * per_seq_chunks) * c.chunk_size
    cache = PrefixKVCache(1, c.kv_heads, c.head_dim, chunk_size=c.chunk_size, max_tokens=max_tokens,
                          dtype=dtype, device=device)

    def fill(batch: chunkattn.Batch) -> None:
        n = batch.num_new_tokens
        k = torch.randn(n, c.kv_heads, c.head_dim, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(n, c.kv_heads, c.head_dim, generator=gen).to(device=device, dtype=dtype)
        cache.store(0, batch, k, v)

    prompt = torch.randint(0, 32000, (c.shared,), generator=gen).tolist()
    own = torch.randint(0, 32000, (c.batch, c.private), generator=gen).tolist()
    seqs = []
    for i in range(c.batch):
        tokens = prompt + own[i][:-1]
        if not tokens:
            seqs.append(cache.add_sequence(own[i][-1:]))
            continue
        seq = cache.add_sequence(tokens + [0])  # + [0]: let the last prompt token come from the cache too
        rest = tokens[seq.num_cached_tokens :]
        if rest:
            fill(cache.extend([seq], [rest]))
        seqs.append(seq)
    step = cache.extend(seqs, [[o[-1]] for o in own])
    fill(step)
    q = torch.randn(c.batch, c.heads, c.head_dim, generator=gen).to(device=device, dtype=dtype)
    return Workload(config, cache, step, q, None, None)


# A provider maps a workload to (a zero-argument function computing [B, H, d] outputs, K/V bytes it holds).
Provider = Callable[[Workload], tuple[Callable[[], torch.Tensor], int]]


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (missing package or device); the sweep notes it and goes on."""


__all__ = ["DTYPES", "Config", "Provider", "ProviderUnavailable", "Workload", "build_workload"]
