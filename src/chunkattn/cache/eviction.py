"""Eviction policies: which retained chunk leaves the cache first when room is needed.

The tree keeps a heap of evictable leaves (unreferenced chunks with no children) ordered by the policy's
:meth:`EvictionPolicy.priority`, lowest first. Priorities may change while a leaf waits in the heap (a
prefix was read again); the tree re-checks a leaf's priority when it pops it, so a policy only has to be a
pure function of the node. A new policy is one subclass; pass it as ``PrefixKVCache(eviction=...)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chunkattn.cache.tree import Node


class EvictionPolicy(ABC):
    """Orders evictable leaves: the one with the lowest priority is evicted first."""

    name: str = "policy"

    @abstractmethod
    def priority(self, node: Node) -> tuple[int, ...]:
        """A sort key of ``node`` (ties are broken by node id, oldest first)."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first (the default; what vLLM and SGLang do)."""

    name = "lru"

    def priority(self, node: Node) -> tuple[int, ...]:
        return (node.last_access,)


class LongestFirstPolicy(EvictionPolicy):
    """Leaves deepest in the tree first, then least recently used: keeps short common prefixes (system
    prompts) longest when many long private tails compete for room."""

    name = "longest-first"

    def priority(self, node: Node) -> tuple[int, ...]:
        return (-node.end_pos, node.last_access)


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRUPolicy, LongestFirstPolicy)}


def make_policy(policy: str | EvictionPolicy | None) -> EvictionPolicy:
    """A policy from its name (``"lru"``, ``"longest-first"``), an instance, or None (LRU)."""
    if policy is None:
        return LRUPolicy()
    if isinstance(policy, EvictionPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"eviction policy must be one of {sorted(POLICIES)} or an EvictionPolicy, got {policy!r}")
    return POLICIES[policy]()
