"""The supported model families; each module registers one (see :mod:`chunkattn.model.registry`)."""

from chunkattn.model.families import llama, mistral, qwen2

__all__ = ["llama", "mistral", "qwen2"]
