"""Model families: which Hugging Face ``model_type`` values chunkattn runs, and with which decoder.

A family is a name, the ``model_type`` values it covers, the decoder class, and the config defaults in
which it differs from Llama. A new Llama-like family is one file in ``chunkattn/model/families/`` that calls
:func:`register_family`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chunkattn.errors import UnsupportedModelError
from chunkattn.model.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """How to run one family of checkpoints.

    Attributes
    ----------
    name : the family's name.
    model_types : the ``model_type`` values of ``config.json`` it covers.
    decoder : ``decoder(config)`` builds the model (an ``nn.Module`` with the interface of
        :class:`~chunkattn.model.llama.LlamaForCausalLM`).
    qkv_bias : whether the q/k/v projections have a bias: True or False for every checkpoint of the family,
        None to read ``attention_bias`` from ``config.json`` (default False).
    """

    name: str
    model_types: tuple[str, ...]
    decoder: type[nn.Module]
    qkv_bias: bool | None = None

    def build(self, config: ModelConfig) -> Any:
        return self.decoder(config)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    for t in family.model_types:
        _FAMILIES[t] = family
    return family


def _load_families() -> None:
    importlib.import_module("chunkattn.model.families")


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
