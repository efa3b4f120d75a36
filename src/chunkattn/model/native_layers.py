"""The decoder's layer loop as one native call on the CPU (``chunkattn_layers.DecoderStack``,
``csrc/decoder_cpu.cpp``).

:class:`~chunkattn.model.llama.LlamaForCausalLM` runs its layers through the stack when the step's attention
runs on the ``cpu`` backend and every linear layer multiplies by one of the products the stack knows (the
float32 or bfloat16 panels, quantized blocks, or a dense weight). The stack calls the same kernels as the Python
loop, in the same order with the same arguments, so the logits are bit-equal; what it saves is the Python and
dispatcher overhead of ~9 kernel calls per layer (on the 2-core Zen 4 VM ~3 ms of a ~8.5 ms one-sequence
SmolLM2 decode step). ``CHUNKATTN_NATIVE_LAYERS=0`` keeps the Python loop (for A/B runs and debugging).

The stack holds the layers' tensors. It is rebuilt when it may be stale: a parameter or submodule registered or
replaced in any module (global registration hooks), any attribute of a layer, linear layer or norm set (a bias
set to None, ``eps``, a pack, a quantized weight, a move, a ``forward`` on the instance:
:class:`~chunkattn.model.layers.WatchedModule` counts them), the layer list changed (``del`` / ``insert``), or a
weight or pack changed in place or its storage swapped (versions and data pointers, checked by
``DecoderStack.fresh``: the layers repack such a weight on their next call, so the stack is rebuilt from them).
Forward hooks on the layers or global ones send the step through the Python loop, which runs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from chunkattn import native
from chunkattn.model.layers import GateUpLinear, Linear, RMSNorm, generation, mark_changed, runs_own_forward
from chunkattn.model.quant import QuantizedParts

if TYPE_CHECKING:
    from chunkattn.model.llama import LlamaForCausalLM

ENV = "CHUNKATTN_NATIVE_LAYERS"
# DecoderStack.add_linear's kinds (csrc/decoder_cpu.cpp's LinearKind)
LINEAR_KINDS = {"dense": 0, "panels": 1, "bf16-panels": 2, "quant": 3}
PARTS = 4  # a projection of quantized parts of several kinds (quant.QuantizedParts): DecoderStack.add_linear_parts


def _on_registration(module: nn.Module, name: str, value: object) -> None:
    mark_changed()  # every stack rebuilds before its next use


# any parameter or submodule (re)registered anywhere: `module.weight = nn.Parameter(...)`, set_quantized, a layer
# replaced or appended, ...
torch.nn.modules.module.register_module_parameter_registration_hook(_on_registration)
torch.nn.modules.module.register_module_module_registration_hook(_on_registration)


def _hooked(model: LlamaForCausalLM) -> bool:
    """Whether a module the stack replaces has forward hooks (the stack would skip them: the Python loop runs
    them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for layer in model.model.layers for m in layer.modules())


def enabled() -> bool:
    """Whether the native layer loop may be used (``CHUNKATTN_NATIVE_LAYERS`` is not ``0``)."""
    return os.environ.get(ENV, "1") != "0"


def _linear_spec(layer: nn.Module, x: torch.Tensor) -> tuple | None:
    """``DecoderStack.add_linear``'s arguments for ``layer`` (a Linear or GateUpLinear), or None when the stack
    cannot multiply by it the way ``layer.forward`` would."""
    if not (runs_own_forward(layer, Linear) or runs_own_forward(layer, GateUpLinear)):
        return None
    assert isinstance(layer, Linear)
    gate_up = isinstance(layer, GateUpLinear)
    n = layer.intermediate_size if isinstance(layer, GateUpLinear) else layer.out_features
    bias = layer.bias
    empty = torch.empty(0)
    if layer.quant is not None:
        q = layer.quant
        if not q.kernel_runs(x):
            return None
        if isinstance(q, QuantizedParts):  # (DecoderStack.add_linear_parts' arguments, after this kind)
            return (PARTS, [p.packed for p in q.parts], [p.kind for p in q.parts],
                    [p.out_features for p in q.parts], bias)
        return (LINEAR_KINDS["quant"], empty, q.packed, bias, q.out_features, q.kind, 0, gate_up)
    packed = layer._usable_pack(x)  # repacks a weight changed in place
    if packed is None:  # (dense_weight: unpacked for the stack if only the pack holds it)
        return (LINEAR_KINDS["dense"], layer.dense_weight(), empty, bias, n, 0, 0, gate_up)
    if packed.kind not in LINEAR_KINDS:  # "onednn": its product is not called from the stack
        return None
    max_rows = min(layer.panel_max_rows(), 2**62) if packed.kind == "bf16-panels" else 0
    return (LINEAR_KINDS[packed.kind], layer.weight, packed.tensor, bias, n, 0, max_rows, gate_up)


def build(model: LlamaForCausalLM, x: torch.Tensor) -> Any | None:
    """A ``DecoderStack`` of ``model``'s layers for inputs like ``x`` (the embeddings of a step), or None when
    some layer runs differently than the stack could."""
    parts = model.native_layer_parts()
    if not parts:
        return None
    cfg = model.config
    stack = torch.classes.chunkattn_layers.DecoderStack(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    for in_norm, qkv, o, post_norm, gate_up, down in parts:
        if not (runs_own_forward(in_norm, RMSNorm) and runs_own_forward(post_norm, RMSNorm)):
            return None
        specs = [_linear_spec(m, x) for m in (qkv, o, gate_up, down)]
        if any(s is None for s in specs):
            return None
        for i, spec in enumerate(specs):
            if i % 2 == 0:  # input_layernorm before qkv_proj, post_attention_layernorm before gate_up_proj
                norm = in_norm if i == 0 else post_norm
                stack.add_norm(norm.weight, norm.eps)
            assert spec is not None
            if spec[0] == PARTS:
                stack.add_linear_parts(*spec[1:])
            else:
                stack.add_linear(*spec)
    return stack


def _key(model: LlamaForCausalLM, x: torch.Tensor) -> tuple:
    """What a stack is built for: the layers' generation, the dtype, the layers themselves (ModuleList's del /
    insert / pop move modules without any hook)."""
    return generation(), x.dtype, tuple(map(id, model.model.layers))


class NativeLayers:
    """A model's stack and when it applies; one per model (``LlamaForCausalLM.native_layers``)."""

    def __init__(self) -> None:
        self.stack: Any | None = None
        self.key: tuple | None = None  # _key's value the stack (or its absence) was built for
        self.handles = -1  # hook handles ever made when the layers were last checked for hooks
        self.hooked = False

    def __getstate__(self) -> dict:  # pickles and deep copies rebuild it (it holds the model's tensors)
        return {**self.__dict__, "stack": None, "key": None, "handles": -1, "hooked": False}

    def get(self, model: LlamaForCausalLM, x: torch.Tensor) -> Any | None:
        key = _key(model, x)
        rebuild = key != self.key or (self.stack is not None and not self.stack.fresh())
        # a hook registered anywhere makes a handle (one counter): only then, on a rebuild (a module that already
        # had hooks may have joined the layers), or while hooked, look at the layers' hooks
        if rebuild or RemovableHandle.next_id != self.handles or self.hooked:
            self.handles = RemovableHandle.next_id
            self.hooked = _hooked(model)
        if self.hooked:
            return None
        if rebuild:
            self.stack = None  # drop the old tensors before building the new stack
            self.stack = build(model, x)
            # building may repack a weight changed in place (a new generation)
            self.key = _key(model, x)
        return self.stack

    def run(self, model: LlamaForCausalLM, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            attn: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All layers through the stack, or None when it does not apply (run the Python loop)."""
        from chunkattn.attention.cpu_tpp import CpuBackend, plan_workspace

        if self.key is not None and self.key[0] != generation():
            self.stack = self.key = None  # stale: let its tensors go (old packs) even if no step rebuilds it
        hooks = nn.modules.module  # global forward hooks: the Python loop calls them
        if (type(attn) is not CpuBackend or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous()
                or attn.cache.dtype != x.dtype or not enabled() or not native.available()):
            return None
        stack = self.get(model, x)
        if stack is None:
            return None
        cfg, cache, batch = model.config, attn.cache, attn.batch
        pool = cache.pool
        if pool.k.shape[0] < stack.num_layers() or tuple(pool.k.shape[2:]) != (cfg.num_kv_heads, cfg.head_dim):
            return None  # a cache of another shape: the Python loop indexes it (or fails) as it does
        ws = plan_workspace(attn.attention_plan, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, x.dtype)
        src = None if batch.all_rows_stored else batch.store_rows.contiguous()
        return stack.run(x, cos, sin, pool.k, pool.v, batch.store_kv.contiguous(), src, ws.o_part, ws.ml_part,
                         ws.idx, attn.scale)
