"""Small helpers shared across the package."""

from __future__ import annotations

from typing import Any


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), exactly (no float)."""
    return -(-a // b)


#: The most of its device's available memory the weights, or the K/V pool, may take when they are allocated: the
#: rest is for a step's activations and logits, the allocator and whatever else runs beside them.
MEMORY_FRACTION = 0.9


def available_memory(device: Any) -> int | None:
    """Bytes ``device`` (a ``torch.device``) has available now: a CPU ``MemAvailable`` of ``/proc/meminfo``, a
    CUDA device its free memory; None where that cannot be told."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def memory_shortfall(need: int, device: Any, what: str) -> tuple[str, int] | None:
    """None if ``need`` bytes fit in :data:`MEMORY_FRACTION` of the memory ``device`` has available now (or that
    cannot be told); else the clause of a refusal saying so (``what``: what may take the fraction) and the bytes
    that would fit."""
    available = available_memory(device)
    if available is None or need <= MEMORY_FRACTION * available:
        return None
    where = "this machine" if device.type == "cpu" else str(device)
    return (f"{where} has {available / 1024**3:.1f} GiB available and {what} may take {MEMORY_FRACTION:.0%} of it",
            int(MEMORY_FRACTION * available))


__all__ = ["MEMORY_FRACTION", "available_memory", "cdiv", "memory_shortfall"]
