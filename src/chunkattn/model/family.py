"""A model family's description (:class:`ModelFamily`): its own module, so that the family modules
(``chunkattn/model/families/``) and the registry both import it, not each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from chunkattn.model.config import ModelConfig


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


__all__ = ["ModelFamily"]
