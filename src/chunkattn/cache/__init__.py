"""The prefix-aware K/V cache: tree of chunks (``tree``), pool and sequences (``cache``), batch plans (``plan``)."""

from chunkattn.cache.cache import Batch, PrefixKVCache, Sequence
from chunkattn.cache.plan import AttentionPlan
from chunkattn.cache.tree import ChunkTree, Node

__all__ = ["AttentionPlan", "Batch", "ChunkTree", "Node", "PrefixKVCache", "Sequence"]
