"""The Triton backend's registration. The kernels (``triton_tpp``) are imported on first use, so that
importing chunkattn never imports Triton (whose CPU interpreter must be chosen before it is imported)."""

from __future__ import annotations

import importlib.util

import torch

from chunkattn.attention.backend import PlannedBackend, register_backend


@register_backend
class TritonBackend(PlannedBackend):
    """Two-phase partition in Triton kernels: GPUs (and Triton's CPU interpreter, for tests)."""

    name = "triton"

    @classmethod
    def auto_priority(cls, device: torch.device) -> int | None:
        return 10 if device.type == "cuda" and importlib.util.find_spec("triton") is not None else None

    def run(self, q: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        from chunkattn.attention.triton_tpp import triton_attention

        cache = self.cache
        return triton_attention(q, cache.k_cache[layer], cache.v_cache[layer], self.attention_plan, self.scale)
