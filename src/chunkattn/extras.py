"""Optional parts and their packages ("extras" in pyproject.toml), and the error a missing one gives.

The core (cache, attention, model, engine, ``LLM``, ``chunkattn demo`` / ``generate`` / ``info``) needs only the
core dependencies. ``server``: the OpenAI-compatible HTTP server (``chunkattn serve``); ``bench``: plots and the
HTTP client of the benchmarks; ``cluster``: replicas on Ray Serve (with ``server``).
"""

from __future__ import annotations

import importlib
from typing import Any

EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"),
    "bench": ("matplotlib", "httpx"),
    "cluster": ("ray",),
}


class MissingExtraError(ImportError):
    """A feature needs packages of an extra that is not installed; the message says how to install it."""


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``feature`` and the install command if a package of ``extra``
    cannot be imported."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{feature} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                                f"pip install 'chunkattn[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the benchmarks' plots), or the ``bench`` extra's error."""
    require("bench", "plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
