"""Llama 2/3 and SmolLM2: the reference family."""

from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("llama", ("llama",), LlamaForCausalLM))
