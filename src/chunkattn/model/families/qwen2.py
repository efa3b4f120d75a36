"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (always: Qwen2 ignores
``attention_bias``)."""

from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("qwen2", ("qwen2",), LlamaForCausalLM, qkv_bias=True))
