"""The supported model families: each module defines one ``FAMILY`` (registered by
:mod:`chunkattn.model.registry` on first use)."""

from chunkattn.model.families import llama, mistral, qwen2

__all__ = ["llama", "mistral", "qwen2"]
