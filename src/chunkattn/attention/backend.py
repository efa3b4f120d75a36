"""The attention-backend interface and its registry.

A backend computes causal attention of a batch's new tokens over their sequences in a
:class:`~chunkattn.PrefixKVCache`. The engine uses it in two phases, as FlashInfer's wrappers do:

* :meth:`AttentionBackend.plan` once per step: validates the batch against the cache and builds (or, for
  the next decode step of the same sequences, advances in place) the backend's metadata;
* :meth:`AttentionBackend.forward` once per layer: writes the layer's new K/V and returns the attention
  output, with no per-layer validation beyond tensor shapes.

A new backend is one file: subclass :class:`AttentionBackend`, give it a ``name``, implement ``_prepare``
and ``run``, and decorate it with :func:`register_backend`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from chunkattn.cache.cache import Batch, PrefixKVCache
from chunkattn.cache.plan import AttentionPlan

_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", None) or cls.name == "auto":
        raise ValueError(f"{cls.__name__} needs a name other than 'auto'")
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    """Registered backends, plus ``"auto"``."""
    return ("auto", *_REGISTRY)


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend ``name`` means for tensors on ``device`` (``"auto"``: the fastest one that
    runs there)."""
    if name == "auto":
        candidates = [cls for cls in _REGISTRY.values() if cls.auto_priority(device) is not None]
        if not candidates:
            raise ValueError(f"no attention backend runs on {device}")
        return max(candidates, key=lambda cls: cls.auto_priority(device) or 0).name
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return name


def get_backend(name: str, cache: PrefixKVCache, scale: float | None = None) -> AttentionBackend:
    """An instance of backend ``name`` (``"auto"`` resolved for the cache's device) bound to ``cache``."""
    return _REGISTRY[resolve_backend(name, cache.device)](cache, scale=scale)


class AttentionBackend(ABC):
    """Attention over one :class:`PrefixKVCache`: ``plan`` once per step, ``forward`` (or ``run``) per layer.

    Parameters
    ----------
    cache : the K/V cache the backend reads (and ``forward`` writes).
    scale : score scale; default ``1 / sqrt(head_dim)``.
    """

    name: ClassVar[str] = ""

    def __init__(self, cache: PrefixKVCache, scale: float | None = None):
        self.cache = cache
        self.scale = 1.0 / math.sqrt(cache.head_dim) if scale is None else float(scale)
        self._batch: Batch | None = None

    @classmethod
    def auto_priority(cls, device: torch.device) -> int | None:
        """How much ``"auto"`` prefers this backend on ``device`` (higher wins); None: never chosen."""
        return None

    @property
    def batch(self) -> Batch:
        if self._batch is None:
            raise RuntimeError(f"{type(self).__name__}.plan(batch) must be called before running a layer")
        return self._batch

    def plan(self, batch: Batch) -> None:
        """Validate ``batch`` (from this cache's latest ``extend``) and prepare every layer's attention.

        For the next decode step of the same sequences, when no chunk was added, split or evicted, the
        previous step's metadata is advanced in place (lengths only) instead of rebuilt.
        """
        self.cache.check_batch(batch)
        self._batch = batch
        self._prepare(batch)

    @abstractmethod
    def _prepare(self, batch: Batch) -> None:
        """Build or advance the metadata of ``batch`` (already validated)."""

    @abstractmethod
    def run(self, q: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the planned batch's new tokens on ``layer`` (their K/V already stored).

        Parameters
        ----------
        q : ``[num_new_tokens, num_q_heads, head_dim]``, the cache's dtype and device; ``num_q_heads`` a
            multiple of ``num_kv_heads`` (GQA: query head ``h`` reads K/V head ``h // group``).

        Returns
        -------
        out : ``[num_new_tokens, num_q_heads, head_dim]`` in ``q.dtype``.
        lse : ``[num_new_tokens, num_q_heads]`` float32 log-sum-exp of the scaled scores, natural log.
        """

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the layer's new K/V (``[num_new_tokens, num_kv_heads, head_dim]`` each), then attend."""
        self.cache.write_kv(layer, self.batch, k, v)
        return self.run(q, layer)[0]


class PlannedBackend(AttentionBackend):
    """A backend whose per-batch metadata derives from the cache's :class:`AttentionPlan` (shared chunks,
    each sequence's private chunks), kept in ``plan.workspaces`` so that it advances with the plan."""

    def __init__(self, cache: PrefixKVCache, scale: float | None = None):
        super().__init__(cache, scale)
        self._plan: AttentionPlan | None = None

    def _prepare(self, batch: Batch) -> None:
        self._plan = self.cache.plan(batch)

    @property
    def attention_plan(self) -> AttentionPlan:
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}.plan(batch) must be called before running a layer")
        return self._plan
