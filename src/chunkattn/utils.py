"""Small helpers shared across the package."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
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


@functools.cache
def libc() -> Any:
    """The C library (``ctypes.CDLL``) on Linux, for glibc's malloc settings; None elsewhere or where it cannot be
    loaded. Its glibc-only functions may be missing (musl): look them up with ``getattr``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


RELEASE_EVERY = 256 << 20  # bytes freed between two malloc_trim calls (each takes ~2 ms)
_freed_since_release = 0


def release_freed_memory(freed: int) -> None:
    """Count ``freed`` bytes as just freed, and once :data:`RELEASE_EVERY` of them have been, hand the memory
    glibc's malloc holds free back to the OS (``malloc_trim``; nothing elsewhere).

    A load frees a matrix's temporaries (a dense weight once quantized, blocks once packed) and allocates the
    next one's, of other sizes, in the threads' several arenas: without this, the free holes between them added
    0.2-0.8 GiB to the peak of a Llama-3.2-1B load, varying from run to run."""
    global _freed_since_release
    _freed_since_release += freed
    if _freed_since_release < RELEASE_EVERY:
        return
    _freed_since_release = 0
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


__all__ = ["MEMORY_FRACTION", "RELEASE_EVERY", "available_memory", "cdiv", "libc", "memory_shortfall",
           "release_freed_memory"]
