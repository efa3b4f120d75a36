"""Decoders on the prefix cache: config, model families (a registry), layers, loading from HF directories
and GGUF files."""

from chunkattn.model.config import ModelConfig
from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.loader import (
    LoadedModel,
    ModelNotFoundError,
    build_model,
    default_model_path,
    load_model,
    load_tokenizer,
    to_transformers,
)
from chunkattn.model.registry import (
    ModelFamily,
    UnsupportedModelError,
    config_from_hf,
    family_for,
    register_family,
    supported_model_types,
)

__all__ = ["LlamaForCausalLM", "LoadedModel", "ModelConfig", "ModelFamily", "ModelNotFoundError",
           "UnsupportedModelError", "build_model", "config_from_hf", "default_model_path", "family_for", "load_model",
           "load_tokenizer", "register_family", "supported_model_types", "to_transformers"]
