"""Building blocks of the decoders: a linear layer with CPU weight prepacking, RMSNorm with a fused residual
add, rotary embeddings, SiLU-and-multiply. On CPU tensors (float32, bfloat16) the elementwise ones run as
single-pass native kernels (:mod:`chunkattn.native`); elsewhere as PyTorch ops."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import torch
from torch import nn

from chunkattn import native
from chunkattn.model.config import ModelConfig
from chunkattn.model.quant import QuantizedParts, QuantizedWeight
from chunkattn.utils import cdiv

_generation = 0
M = TypeVar("M", bound=nn.Module)


def generation() -> int:
    """A counter bumped by :func:`mark_changed`: whenever an attribute of a :class:`WatchedModule` (the decoder's
    layers and their linear layers and norms) is set or deleted (a parameter or submodule replaced, a bias set to
    None, ``eps``, a pack (:meth:`Linear.prepack`), a quantized weight, a moved module, a ``forward`` set on the
    instance), and on any parameter or submodule registration (:mod:`chunkattn.model.native_layers`' hooks). What
    a stack of the layers holds is then stale."""
    return _generation


def mark_changed() -> None:
    """Bump :func:`generation`."""
    global _generation
    _generation += 1


class WatchedModule(nn.Module):
    """An ``nn.Module`` whose attribute assignments and deletions bump :func:`generation`."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        mark_changed()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        mark_changed()


def runs_own_forward(module: object, cls: type[M]) -> TypeGuard[M]:
    """Whether ``module`` is exactly a ``cls`` (not a subclass) with its class's ``forward`` (none set on the
    instance): whether it computes as that class's code does."""
    return type(module) is cls and "forward" not in module.__dict__


def _native(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and native.available()


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight reordered for the CPU, and the weight version it was made from."""

    # "panels" (chunkattn_layers.linear / linear_silu_mul, float32), "bf16-panels" (chunkattn_layers.linear_amx /
    # linear_silu_mul_amx, bfloat16) or "onednn" (mkldnn._linear_pointwise)
    kind: str
    # panels: [ceil(out / 48), in, 48] (GateUpLinear: [ceil(I / 24), in, 48]); bf16-panels: [ceil(out / 32),
    # ceil(in / 32), 2, 16, 32] (GateUpLinear: ceil(I / 16) panels); onednn: opaque
    tensor: torch.Tensor
    version: tuple[int, int]  # (weight._version, weight.data_ptr()) when packed: a change makes it stale
    batch_hint: int  # the rows oneDNN tuned its layout for


def unpack_weight(packed: PackedWeight, out_features: int, in_features: int, gate_up: bool) -> torch.Tensor:
    """The dense ``[out, in]`` weight a chunkattn pack (``panels`` or ``bf16-panels``) was made from: the inverse
    of ``csrc/linear_cpu.cpp``'s ``pack`` and ``csrc/linear_amx.cpp``'s ``pack_amx`` (a view of the pack reordered
    and copied; gate/up packs give ``[gate; up]``)."""
    t = packed.tensor
    if packed.kind == "panels":  # [P, K, 48]: lane c of panel p is output 48p + c (gate_up: 24p + c % 24)
        if not gate_up:
            return t.permute(0, 2, 1).reshape(-1, in_features)[:out_features].contiguous()
        halves = t.view(t.shape[0], in_features, 2, 24).permute(2, 0, 3, 1).reshape(2, -1, in_features)
        return halves[:, : out_features // 2].reshape(out_features, in_features).contiguous()
    if packed.kind == "bf16-panels":  # [P, S, 2, 16 (k / 2), 32 (16 columns x 2 k)]
        p, steps = t.shape[0], t.shape[1]
        tiles = t.view(p, steps, 2, 16, 16, 2).permute(2, 0, 4, 1, 3, 5)  # [j, p, c, s, r, k % 2]
        if not gate_up:  # column 32p + 16j + c
            w = tiles.permute(1, 0, 2, 3, 4, 5).reshape(p * 32, steps * 32)
            return w[:out_features, :in_features].contiguous()
        w = tiles.reshape(2, p * 16, steps * 32)  # tile 0: gate column 16p + c, tile 1: the same up column
        return w[:, : out_features // 2, :in_features].reshape(out_features, in_features).contiguous()
    raise ValueError(f"a {packed.kind!r} pack cannot be unpacked")


class Linear(WatchedModule):
    """``y = x W^T (+ b)`` whose weight can be prepacked for the CPU.

    On the CPU, :meth:`prepack` reorders the weight once: float32 on CPUs with AVX-512 into chunkattn's own
    panels (``chunkattn_layers.linear``, see ``csrc/linear_cpu.cpp``: 8-row x 48-column register tiles over
    sequential weight panels, the next panel prefetched while one is used), bfloat16 on CPUs with AMX or
    AVX512-BF16 into panels of AMX tiles' operand layout (``chunkattn_layers.linear_amx``, ``csrc/linear_amx.cpp``;
    multiplied on the tiles up to :meth:`panel_max_rows` rows: all of them up to K = 4096, else while x fits one
    1 MB row block, ``F.linear`` above, where oneDNN's large-matrix kernels win; without AMX by ``vdpbf16ps`` at
    every row count), bfloat16 (and float32) elsewhere into oneDNN's blocked layout. All beat ``F.linear`` on the
    thin matrices of decoding by far (on the Zen 5 dev VM torch's fp32 matmul ran at ~150 GFLOP/s, oneDNN's packed
    product at ~270-310 with 32 rows and the panels at ~380; on the AMX Xeon VM SmolLM2's bf16 decode products at
    32 rows took 14.9 ms through oneDNN's packed product and 10.8 through the AMX panels; on the Zen 4 VM without
    AMX the panels by ``vdpbf16ps`` took 0.65-0.78x oneDNN's packed time on SmolLM2's products at 1-64 rows and
    0.97x at 1088, 0.89-0.99x on Llama-3.2-1B's, with ``F.linear`` slower than both at every row count;
    ``benchmarks/linear_cpu.py``, the README's results).
    The packed copy is used only without autograd
    (inference) and is not part of the state dict; the dense ``weight`` stays the parameter. A weight changed in
    place after packing (``load_state_dict``, ``weight.data.copy_``) is repacked on the next call; moving the
    module to another device or dtype drops the packed copy. A loaded model keeps its weights only packed where the
    pack serves every product (:meth:`drop_dense`; :meth:`dense_weight` unpacks them): the 1B shape in bf16 held
    2.3 GiB dense + 2.3 GiB packed, now the packs and its tied embedding table.
    """

    # bf16 rows up to which the AMX panels run (panel_max_rows). Up to K = AMX_ALL_ROWS_MAX_K at every row count:
    # above 128 rows the kernel takes groups of panels (1 MB) through every pair of row tiles (csrc/linear_amx.h's
    # grouped_products), which on the AMX Xeon VM took 0.42-0.98x F.linear's time at 129-2048 rows on SmolLM2's,
    # Llama-3.2-1B's and 8B's products with K <= 4096 (benchmarks/linear_cpu.py-style loop, 9 alternations) but
    # 1.0-1.15x on the 1B's K = 8192 and 1.26-1.39x on the 8B's K = 14336. There, the panels run while x fits one
    # 1 MB row block (every weight read once), F.linear above; at 1-32 rows the panels win everywhere (1.3-1.7x).
    AMX_ALL_ROWS_MAX_K = 4096
    AMX_MIN_ROWS_LIMIT = 64
    AMX_BLOCK_BYTES = 1 << 20  # kXBlockBytes in csrc/linear_amx.h

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: PackedWeight | None = None
        self.quant: QuantizedWeight | QuantizedParts | None = None

    def set_quantized(self, quant: QuantizedWeight | QuantizedParts, dtype: torch.dtype = torch.bfloat16) -> None:
        """Multiply by ``quant`` (block-quantized, see :mod:`chunkattn.model.quant`) from now on. ``weight``
        becomes an empty placeholder of ``dtype`` (the dtype of the activations): the dense weight is not kept."""
        want = (self.out_features, self.in_features)
        have = (2 * quant.out_features if quant.gate_up else quant.out_features, quant.in_features)
        if have != want or quant.gate_up != isinstance(self, GateUpLinear):
            raise ValueError(f"a {type(self).__name__} of weight {list(want)} cannot take a quantized weight of "
                             f"{list(have)} (gate_up={quant.gate_up})")
        self.quant, self.packed = quant, None
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (dequantized, in the placeholder's dtype, when quantized; unpacked after
        :meth:`drop_dense`)."""
        if self.quant is not None:
            return self.quant.dequantize().to(self.weight.dtype)
        if self.dense_dropped:
            assert self.packed is not None
            with torch.inference_mode(False):  # (a plain tensor, also when asked for inside inference mode)
                return unpack_weight(self.packed, self.out_features, self.in_features,
                                     isinstance(self, GateUpLinear))
        return self.weight

    @property
    def dense_dropped(self) -> bool:
        """Whether the pack alone holds the weight (:meth:`drop_dense`): ``weight`` is the ``[0, 0]`` placeholder
        (a tensor given for it since, e.g. by ``weight.data = ...``, is the weight: repacked at the next call)."""
        return self.quant is None and self.packed is not None and self.weight.shape == (0, 0)

    def drop_dense(self) -> bool:
        """Keep the weight only as its pack, halving the layer's memory: ``weight`` becomes an empty ``[0, 0]``
        placeholder (its dtype and device) and :meth:`dense_weight` unpacks the pack when the dense weight is asked
        for (Hugging Face's state dict; :meth:`prepack`, a copy or a move to another device or dtype restore it
        first). Only where the pack serves every product: chunkattn's fp32 panels, and its bf16 panels where they
        take every row count (not on AMX at K > ``AMX_ALL_ROWS_MAX_K``, where ``F.linear`` takes large batches).
        Returns whether it did."""
        packed = self.packed
        if (packed is None or self.dense_dropped or self.quant is not None
                or packed.version != self._weight_version() or not self.pack_replaces_dense(self.weight.dtype)):
            return False
        w = self.weight
        self.weight = nn.Parameter(torch.empty(0, 0, dtype=w.dtype, device=w.device), requires_grad=False)
        self.packed = PackedWeight(packed.kind, packed.tensor, self._weight_version(), packed.batch_hint)
        return True

    def restore_dense(self) -> None:
        """Undo :meth:`drop_dense`: the dense weight again (unpacked; the pack stays, made from it)."""
        packed = self.packed
        if self.dense_dropped and packed is not None:
            self.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
            self.packed = PackedWeight(packed.kind, packed.tensor, self._weight_version(), packed.batch_hint)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if prefix + "weight" in state_dict:  # (loaded into the dense weight: repacked at the next call)
            self.restore_dense()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def can_prepack(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                and (torch.backends.mkldnn.is_available() or Linear.uses_panels(weight)
                     or Linear.uses_bf16_panels(weight)))

    @staticmethod
    def uses_panels(weight: torch.Tensor) -> bool:
        """Whether :meth:`prepack` packs this weight into chunkattn's panels (float32 CPU, AVX-512)."""
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and native.linear_supported()

    @staticmethod
    def uses_bf16_panels(weight: torch.Tensor) -> bool:
        """Whether :meth:`prepack` packs this weight into bf16 panels (``chunkattn_layers.linear_amx``): a bfloat16
        CPU weight on a CPU with AMX tiles or AVX512-BF16."""
        return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and native.bf16_panels_supported()

    def pack_replaces_dense(self, dtype: torch.dtype) -> bool:
        """Whether, with a ``dtype`` CPU weight, the pack alone can hold this layer's weight: chunkattn's panels
        serving every row count. The rule :meth:`drop_dense` applies, and what the loader's memory check counts
        (where it is False a load keeps both)."""
        probe = torch.empty(0, 0, dtype=dtype)
        return self.uses_panels(probe) or (self.uses_bf16_panels(probe) and self.panel_max_rows() == sys.maxsize)

    def _weight_version(self) -> tuple[int, int]:
        return self.weight._version, self.weight.data_ptr()

    def prepack(self, batch_hint: int = 32) -> bool:
        """Pack the weight for the CPU (fp32/bf16); returns whether it did. ``batch_hint``: the rows oneDNN
        tunes its layout for."""
        self.restore_dense()
        self.packed = None
        if self.quant is not None or not self.can_prepack(self.weight):
            return False
        with torch.no_grad():
            w = self.weight.detach()
            if self.uses_panels(w):
                self.packed = PackedWeight("panels", self._pack_panels(w), self._weight_version(), batch_hint)
            elif self.uses_bf16_panels(w):
                self.packed = PackedWeight("bf16-panels", self._pack_bf16_panels(w), self._weight_version(), batch_hint)
            else:
                self.packed = PackedWeight("onednn", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint),
                                           self._weight_version(), batch_hint)
        return True

    def _pack_panels(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.chunkattn_layers.pack_linear(w)

    def _pack_bf16_panels(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.chunkattn_layers.pack_linear_amx(w)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - .to() / .cuda() / .half() drop the pack
        self.restore_dense()
        self.packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # pickles and deep copies leave the pack behind (it is per machine)
        state = {**super().__getstate__(), "packed": None}
        if self.dense_dropped:  # (the copy gets the dense weight the pack holds)
            state["_parameters"] = {**state["_parameters"],
                                    "weight": nn.Parameter(self.dense_weight(), requires_grad=False)}
        return state

    def _usable_pack(self, x: torch.Tensor) -> PackedWeight | None:
        """The pack to multiply ``x`` with (repacked first if the weight changed in place), or None: use the
        dense weight (no pack, another dtype or device, or autograd)."""
        packed = self.packed
        if (packed is None or x.dtype != self.weight.dtype or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return None
        if packed.version != self._weight_version():  # changed in place since packed
            self.prepack(packed.batch_hint)
            packed = self.packed
            assert packed is not None
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[N, in_features]`` -> ``[N, out_features]``."""
        if self.quant is not None:
            return self.quant.linear(x, self.bias)
        return self._product(x, self._usable_pack(x))

    def _product(self, x: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
        """``x W^T (+ b)`` from ``packed`` (a pack of :meth:`_usable_pack`), or the dense weight when None."""
        if packed is None:  # (after drop_dense: autograd, or x of another dtype; unpacked for the call)
            return nn.functional.linear(x, self.dense_weight(), self.bias)
        if packed.kind == "panels":
            return torch.ops.chunkattn_layers.linear(x, packed.tensor, self.out_features, self.bias)
        if packed.kind == "bf16-panels":
            if x.shape[0] > self.panel_max_rows():
                return nn.functional.linear(x, self.dense_weight(), self.bias)
            return torch.ops.chunkattn_layers.linear_amx(x, packed.tensor, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.tensor, self.bias, "none", [], "")

    def panel_max_rows(self) -> int:
        """Rows up to which the bfloat16 panels multiply this layer (F.linear above). On AMX tiles every row count
        up to K = AMX_ALL_ROWS_MAX_K, else while x fits a 1 MB row block; by AVX512-BF16 dot products (no AMX)
        every row count."""
        if self.in_features <= self.AMX_ALL_ROWS_MAX_K or not native.amx_linear_supported():
            return sys.maxsize
        return max(self.AMX_MIN_ROWS_LIMIT, self.AMX_BLOCK_BYTES // (2 * (cdiv(self.in_features, 32) * 32)))

    def extra_repr(self) -> str:
        packed = self.packed.kind if self.packed is not None else "no"
        quant = f", quantized={self.quant.qtype}" if self.quant is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f", prepacked={packed}{quant}")


class Embedding(nn.Embedding):
    """Token embeddings whose table can be block-quantized (:meth:`set_quantized`; a tied LM head shares the
    pack): then a lookup dequantizes the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.quant: QuantizedWeight | None = None

    def reset_parameters(self) -> None:
        # A model is built on the meta device, then given its weights: nothing to initialize there, and torch's
        # first normal_ on a meta tensor imports its decompositions (~0.6-1 s of every start)
        if not self.weight.is_meta:
            super().reset_parameters()

    def set_quantized(self, quant: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> None:
        if quant.gate_up or (quant.out_features, quant.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"an embedding of {[self.num_embeddings, self.embedding_dim]} cannot take a quantized "
                             f"weight of {[quant.out_features, quant.in_features]}")
        self.quant = quant
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        return self.weight if self.quant is None else self.quant.dequantize().to(self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return super().forward(input_ids)
        rows = self.quant.lookup(input_ids.reshape(-1))
        return rows.to(device=self.weight.device, dtype=self.weight.dtype).reshape(*input_ids.shape,
                                                                                  self.embedding_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", quantized={self.quant.qtype}" if self.quant is not None else "")


class RMSNorm(WatchedModule):
    """RMSNorm; ``forward(x, residual)`` first adds ``x`` to the residual stream (vLLM's fused form)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: ``[N, dim]``. Without ``residual``: the normalised ``x``. With it: ``(norm(residual + x),
        residual + x)``; both inputs may be overwritten. Statistics in float32 whatever the dtype."""
        if _native(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            if residual is None:
                out = x.clone()
                torch.ops.chunkattn_layers.add_rms_norm_(out, None, self.weight, self.eps)
                return out
            torch.ops.chunkattn_layers.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up: [N, 2I]`` -> ``silu(gate_up[:, :I]) * gate_up[:, I:]``, ``[N, I]``."""
    if _native(gate_up) and gate_up.stride(1) == 1:
        return torch.ops.chunkattn_layers.silu_and_mul(gate_up)
    half = gate_up.shape[-1] // 2
    return nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:]


class GateUpLinear(Linear):
    """An MLP's gate and up projections and its activation as one layer: ``x: [N, in_features]`` ->
    ``silu(x W_gate^T) * (x W_up^T)``, ``[N, intermediate_size]``.

    ``weight`` is ``[W_gate; W_up]``, ``[2 intermediate_size, in_features]``, as for a plain fused gate/up
    projection (checkpoints load the same way). On chunkattn's float32 panels the product and the activation are
    one kernel (``chunkattn_layers.linear_silu_mul``: each panel holds 24 gate and the same 24 up columns, and the
    register tile's epilogue applies SiLU-and-multiply), so the ``[N, 2 intermediate_size]`` product is never
    stored; likewise on the bfloat16 panels (16 gate and 16 up columns a panel,
    ``chunkattn_layers.linear_silu_mul_amx``); elsewhere it is the product, then :func:`silu_and_mul`.
    """

    def __init__(self, in_features: int, intermediate_size: int):
        super().__init__(in_features, 2 * intermediate_size, bias=False)
        self.intermediate_size = intermediate_size

    def _pack_panels(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.chunkattn_layers.pack_gate_up(w)

    def _pack_bf16_panels(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.chunkattn_layers.pack_gate_up_amx(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[N, in_features]`` -> ``[N, intermediate_size]``."""
        if self.quant is not None:
            return self.quant.linear(x)
        packed = self._usable_pack(x)
        if packed is not None and packed.kind == "panels":
            return torch.ops.chunkattn_layers.linear_silu_mul(x, packed.tensor, self.intermediate_size)
        if packed is not None and packed.kind == "bf16-panels" and x.shape[0] <= self.panel_max_rows():
            return torch.ops.chunkattn_layers.linear_silu_mul_amx(x, packed.tensor, self.intermediate_size)
        return silu_and_mul(self._product(x, packed))


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies, with linear or Llama-3 scaling applied (on the CPU, also
    inside a ``torch.device("meta")`` block: the first meta op of some kinds imports torch's decompositions, ~0.6 s
    of a start)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif config.rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin: [N, head_dim / 2]`` float32 of ``positions: [N]`` (computed once per step, used by every layer)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [N, d / 2]
    return freqs.cos(), freqs.sin()


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first ``num_heads`` heads of each row of ``x: [N, width]`` (rotate-half, Hugging
    Face's Llama convention). ``cos, sin: [N, head_dim / 2]`` float32."""
    if _native(x) and x.stride(1) == 1:
        torch.ops.chunkattn_layers.rope_(x, cos, sin, num_heads)
        return
    n, half = x.shape[0], head_dim // 2
    heads = x[:, : num_heads * head_dim].view(n, num_heads, 2, half)  # [N, heads, 2, d / 2]
    x1, x2 = heads[:, :, 0].float(), heads[:, :, 1].float()
    c, s = cos[:, None, :], sin[:, None, :]
    heads[:, :, 0] = (x1 * c - x2 * s).to(x.dtype)
    heads[:, :, 1] = (x2 * c + x1 * s).to(x.dtype)
