"""The prefix-aware K/V cache: tree of chunks (``tree``), K/V storage (``pool``), sequences and the public cache
(``cache``), batch plans (``plan``)."""

from chunkattn.cache.cache import Batch, PrefixKVCache, PrefixMatch, Sequence
from chunkattn.cache.plan import AttentionPlan
from chunkattn.cache.pool import KVPool
from chunkattn.cache.tree import ChunkTree, Node

__all__ = ["AttentionPlan", "Batch", "ChunkTree", "KVPool", "Node", "PrefixKVCache", "PrefixMatch", "Sequence"]
