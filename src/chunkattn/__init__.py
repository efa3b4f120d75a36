"""chunkattn: prefix-aware KV cache and two-phase-partition attention for LLM decoding.

Layout (each layer depends only on those below it; docs/architecture.md has the whole map)::

    cluster/    replicas on Ray Serve, routing by cached prefix, a simulator of many replicas
    server/     the OpenAI-compatible HTTP server (chunkattn serve), over an engine or the replicas
    bench/      benchmarks (kernel micro-benchmark, end-to-end serving, in-process or over HTTP)
    engine/     requests, scheduler (continuous batching), sampling, structured outputs, LLM / AsyncLLM
    model/      Llama-family decoders, model families, checkpoint loading (and the GGUF weight cache)
    attention/  attention backends: reference, native CPU (csrc/), torch (two-phase partition), triton
    cache/      prefix tree of chunks, K/V pool and sequences, batch plans
"""

from chunkattn.attention import attention
from chunkattn.cache import AttentionPlan, Batch, PrefixKVCache, Sequence
from chunkattn.engine import LLM, AsyncLLM, EngineArgs, RequestOutput, SamplingParams
from chunkattn.errors import CacheCorruptedError, CacheFullError, ChunkAttnError, InsufficientMemoryError, SequenceError

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "AttentionPlan",
    "Batch",
    "CacheCorruptedError",
    "CacheFullError",
    "ChunkAttnError",
    "EngineArgs",
    "InsufficientMemoryError",
    "PrefixKVCache",
    "RequestOutput",
    "SamplingParams",
    "Sequence",
    "SequenceError",
    "attention",
]
