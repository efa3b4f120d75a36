"""Llama 2/3 and SmolLM2: the reference family."""

from chunkattn.model.family import ModelFamily
from chunkattn.model.llama import LlamaForCausalLM

FAMILY = ModelFamily("llama", ("llama",), LlamaForCausalLM)
