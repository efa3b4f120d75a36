"""Mistral: the Llama decoder (its sliding window equals its context length in the checkpoints we run)."""

from chunkattn.model.family import ModelFamily
from chunkattn.model.llama import LlamaForCausalLM

FAMILY = ModelFamily("mistral", ("mistral",), LlamaForCausalLM)
