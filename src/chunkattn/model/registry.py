"""Model families: which Hugging Face ``model_type`` values chunkattn runs, and with which decoder.

A family (:class:`~chunkattn.model.family.ModelFamily`) is a name, the ``model_type`` values it covers, the
decoder class, and the config defaults in which it differs from Llama. A new Llama-like family is one file in
``chunkattn/model/families/`` defining ``FAMILY`` (listed in that package's ``__all__``); the registry registers
them on first use. Code outside the package registers its own with :func:`register_family`.
"""

from __future__ import annotations

import importlib
from typing import Any

from chunkattn.errors import UnsupportedModelError
from chunkattn.model.config import ModelConfig
from chunkattn.model.family import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    for t in family.model_types:
        _FAMILIES[t] = family
    return family


_LOADED = False


def _load_families() -> None:
    """Register the built-in families (the ``FAMILY`` of each module of ``chunkattn.model.families``), once."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("chunkattn.model.families")
    for name in package.__all__:
        family = getattr(package, name).FAMILY
        for t in family.model_types:
            _FAMILIES.setdefault(t, family)  # (a family registered by hand earlier wins)
    _LOADED = True


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` dict, its family resolved here (which
    ``model_type`` values run, whether q/k/v carry biases): raises :class:`UnsupportedModelError` naming the
    supported families otherwise."""
    family = family_for(cfg.get("model_type"), cfg.get("architectures"))
    return ModelConfig.from_hf(cfg, qkv_bias=family.qkv_bias)


def family_for(model_type: str | None, architectures: Any = None) -> ModelFamily:
    """The family of ``model_type``; raises :class:`UnsupportedModelError` naming the supported ones."""
    _load_families()
    family = _FAMILIES.get(model_type or "")
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {architectures}) is not supported; chunkattn runs "
            f"{supported_model_types()}")
    return family


def supported_model_types() -> list[str]:
    _load_families()
    return sorted(_FAMILIES)
