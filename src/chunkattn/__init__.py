"""chunkattn: prefix-aware KV cache and two-phase-partition attention for LLM decoding.

Layout (each layer depends only on those below it)::

    bench/      benchmarks (kernel micro-benchmark)
    attention/  attention backends: reference, torch (two-phase partition), triton
    cache/      prefix tree of chunks, K/V pool and sequences, batch plans
"""

from chunkattn.attention import attention
from chunkattn.cache import AttentionPlan, Batch, PrefixKVCache, Sequence
from chunkattn.errors import CacheCorruptedError, CacheFullError, ChunkAttnError, SequenceError

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan",
    "Batch",
    "CacheCorruptedError",
    "CacheFullError",
    "ChunkAttnError",
    "PrefixKVCache",
    "Sequence",
    "SequenceError",
    "attention",
]
