"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (always: Qwen2 ignores
``attention_bias``)."""

from chunkattn.model.family import ModelFamily
from chunkattn.model.llama import LlamaForCausalLM

FAMILY = ModelFamily("qwen2", ("qwen2",), LlamaForCausalLM, qkv_bias=True)
