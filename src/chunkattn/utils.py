"""Small helpers shared across the package."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), exactly (no float)."""
    return -(-a // b)


__all__ = ["cdiv"]
