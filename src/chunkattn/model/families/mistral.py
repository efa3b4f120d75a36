"""Mistral: the Llama decoder (its sliding window equals its context length in the checkpoints we run)."""

from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("mistral", ("mistral",), LlamaForCausalLM))
