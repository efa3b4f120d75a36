"""Llama-family models on the prefix cache: config, the decoder, loading from HF directories and GGUF files."""

from chunkattn.model.config import ModelConfig, UnsupportedModelError
from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.loader import (
    LoadedModel,
    ModelNotFoundError,
    build_model,
    default_model_path,
    load_model,
    to_transformers,
)

__all__ = ["LlamaForCausalLM", "LoadedModel", "ModelConfig", "ModelNotFoundError", "UnsupportedModelError",
           "build_model", "default_model_path", "load_model", "to_transformers"]
