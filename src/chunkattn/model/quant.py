"""Block-quantized weights (GGUF's Q4_0, Q4_1, Q5_1, Q8_0, Q6_K and IQ4_NL; Q5_0, Q4_K, Q5_K, IQ4_XS, Q3_K and
Q2_K read into them), kept as stored and multiplied by chunkattn's kernels.

A decode step reads every weight once, so on a CPU its time is the weights' bytes over the memory bandwidth:
bfloat16 spends 2 bytes a weight, Q4_1 20/32, Q5_1 24/32, Q8_0 34/32, Q6_K 28/32, q3x16 (Q3_K) and q2x16 (Q2_K)
16/32 as held here. Instead of dequantizing a GGUF file to full precision at load (what transformers'
reader does), its blocks stay as they are,
repacked once into the kernel's panels (``csrc/linear_quant.cpp``), and each panel is dequantized to bfloat16 in
registers just before use. The values are exactly those of GGUF's reference dequantization cast to bfloat16
(the K-quants' scale products rounded to float16 first), so a quantized model computes what the same file
dequantized at load and run in bfloat16 computes, up to float32 summation order.

:class:`Blocks` is the plain form (per-row ``q``, per-block scale ``d`` and offset ``m``), read from a GGUF
tensor (:meth:`Blocks.from_gguf`) or made from a float weight (:func:`quantize`, for ``--quantization q8_0``
on checkpoints that are not quantized); :class:`QuantizedWeight` is its pack for a layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chunkattn import native
from chunkattn.errors import ChunkAttnError
from chunkattn.utils import cdiv

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along K, for every type here (q6_k and the x16 types: two scales a block, one per 16)
QTYPES = ("q4_0", "q4_1", "q8_0")  # the types weights are quantized to (--quantization)
# the types held as blocks: QTYPES, and those GGUF's are read into (the x16 types are chunkattn's: q3x16 holds Q3_K,
# q2x16 Q2_K, q4x16 a gate/up of both)
HELD = (*QTYPES, "q6_k", "q5_1", "iq4_nl", "q4x16", "q2x16", "q3x16")
# the kernel's kinds of stored weight: q4 (w = d q + m, q in 0..15; Q4_0 as m = -8 d), q8 (w = d q), q6
# (w = d (q - 32), q in 0..63, d per 16 weights), q5 (w = d q + m, q in 0..31), iq4 (w = d IQ4_VALUES[q]),
# q4x16 (w = d q + m, q in 0..15, d and m per 16 weights), q2x16 (the same, q in 0..3) and q3x16 (w = d (q - 4),
# q in 0..7, d per 16 weights)
_Q4, _Q8, _Q6, _Q5, _IQ4, _Q4X16, _Q2X16, _Q3X16 = range(8)  # (csrc/linear_quant.cpp's Kind)
KINDS = {"q4": _Q4, "q8": _Q8, "q6": _Q6, "q5": _Q5, "iq4": _IQ4, "q4x16": _Q4X16, "q2x16": _Q2X16,
         "q3x16": _Q3X16}  # by name
_KIND = {"q4_0": _Q4, "q4_1": _Q4, "q8_0": _Q8, "q6_k": _Q6, "q5_1": _Q5, "iq4_nl": _IQ4, "q4x16": _Q4X16,
         "q2x16": _Q2X16, "q3x16": _Q3X16}
_TILE_BYTES = {_Q4: 64 + 16 * 16, _Q8: 32 + 16 * 32, _Q6: 64 + 8 * 48, _Q5: 64 + 16 * 16 + 64, _IQ4: 32 + 16 * 16,
               _Q4X16: 128 + 8 * 32, _Q2X16: 128 + 8 * 16, _Q3X16: 64 + 8 * 24}
_NIBBLE_KINDS = (_Q4, _IQ4, _Q4X16)  # the kinds whose q holds two values a byte (q2x16: four; q3x16: 8 in 3 bytes)
_OFFSET_KINDS = (_Q4, _Q5, _Q4X16, _Q2X16)  # the kinds with offsets m
_PER16_KINDS = (_Q6, _Q4X16, _Q2X16, _Q3X16)
_SCALE_BLOCK = {"q6_k": 16, "q4x16": 16, "q2x16": 16, "q3x16": 16}  # weights per scale d (and offset m; else BLOCK)
# bytes of one GGUF block (of 32 weights; K-quants: of 256)
_GGUF_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 4 + 16, "q8_0": 2 + 32, "q5_0": 2 + 4 + 16, "q5_1": 4 + 4 + 16,
                     "q2_k": 16 + 64 + 2 + 2, "q3_k": 32 + 64 + 12 + 2, "q4_k": 2 + 2 + 12 + 128,
                     "q5_k": 2 + 2 + 12 + 32 + 128,
                     "q6_k": 128 + 64 + 16 + 2, "iq4_nl": 2 + 16, "iq4_xs": 2 + 2 + 4 + 128}
_GGUF_BLOCK_WEIGHTS = {"q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256, "iq4_xs": 256}
# GGUF types read into the kernel's kinds with the file's values: Q5_0's ``d (q - 16)`` is Q8_0's ``d q``
# exactly; Q4_K's sub-blocks of 32 are Q4_1 blocks, their scale ``d sc`` and offset ``-dmin m`` (float32
# products of a float16 and a 6-bit integer in GGUF's dequantization) rounded to float16: each within 2^-11 of
# itself, a quarter of the bfloat16 rounding a dequantized load gives every weight; Q5_K's are Q5_1 blocks alike.
# Q6_K is held as itself, its 6-bit values as read and each sub-block of 16's scale ``d sc`` rounded to float16
# alike; IQ4_NL is held as itself (its codebook of 16 int8 values times d), IQ4_XS's sub-blocks of 32 as IQ4_NL
# blocks with ``d (ls - 32)`` rounded to float16. Q3_K is held as q3x16 blocks (its 3-bit values and a float16
# scale per 16 weights: 16/32 bytes a weight where the file has 13.75/32), its ``(d (sc - 32)) q`` (q in -4..3) as
# ``q + 4`` with the scale product rounded to float16; Q2_K as q2x16 blocks (2-bit values, a scale and an offset
# per 16 weights: 16/32 where the file has 10.5/32), its ``(d sc) q - dmin m`` (q in 0..3) with both products
# rounded to float16, as Q4_K's; a gate/up of Q2_K beside Q3_K is one q4x16 product (4-bit values, a scale and an
# offset per 16 weights: 24/32; Q3_K's offset -4 times its scale). Other
# quantized types (IQ2/IQ3, ...) are dequantized at load (``chunkattn.model.loader.gguf_blocks``), not
# re-quantized.
GGUF_CONVERTED = {"q5_0": "q8_0", "q4_k": "q4_1", "q5_k": "q5_1", "q3_k": "q3x16", "q2_k": "q2x16",
                  "iq4_xs": "iq4_nl"}


def gguf_held_as(qtype: str) -> str | None:
    """The type of :data:`HELD` a GGUF type (lower case) is held as at load, or None: dequantized."""
    return qtype if qtype in HELD else GGUF_CONVERTED.get(qtype)


class QuantizationError(ChunkAttnError, ValueError):
    """A weight cannot be quantized or multiplied as asked (its shape, the dtype, the CPU)."""


@functools.cache
def kernel_supported() -> bool:
    """Whether ``chunkattn_layers.linear_quant`` runs here: the native kernels built for a CPU with AVX512-BF16
    (Intel Xeon 3rd generation Cooper Lake, 4th and later; AMD Zen 4 and later). AMX is used where present."""
    return native.available() and bool(torch.ops.chunkattn_layers.quant_linear_supported())


def auto_path(kind: int, rows: int) -> int:
    """The kernel's own choice of path (1 AMX tiles, 2 vector, 3 direct, 4 x as integers) for ``rows`` rows of x on
    a weight of the kernel kind ``kind`` (:attr:`QuantizedWeight.kind`), on this CPU (:func:`kernel_supported`)."""
    if not kernel_supported():  # (which also loads the native library, whose op this is)
        raise QuantizationError("the quantized kernel does not run here (it needs AVX512-BF16 and the native build)")
    return int(torch.ops.chunkattn_layers.quant_auto_path(kind, rows))


def int_x_supported() -> bool:
    """Whether the kernel's path with x as 15-bit integers (``linear(..., path=4)``, vpdpbusd) runs here:
    :func:`kernel_supported` and AVX512-VNNI (every CPU with AVX512-BF16 has it)."""
    return kernel_supported() and bool(torch.ops.chunkattn_layers.quant_int_x_supported())


@dataclass(frozen=True)
class Blocks:
    """A weight ``[N, K]`` as blocks of 32 along K: ``w = d q + m`` (q4 types, q5_1; q4x16 and q2x16 with ``d``
    and ``m`` per 16 weights), ``d q`` (q8_0), ``d (q - 32)`` (q6_k, a scale per 16 weights), ``d (q - 4)`` (q3x16,
    the same) or ``d IQ4_VALUES[q]`` (iq4_nl).

    ``q``: q8_0 ``[N, K]`` int8; q6_k ``[N, K]`` uint8 (0..63); q4 types, q4x16 and iq4_nl ``[N, K / 2]`` uint8,
    two values (0..15; iq4_nl's index :data:`IQ4_VALUES`) a byte as GGUF stores them (byte i of a block's 16:
    value i in the low nibble, value i + 16 in the high one); q5_1 ``[N, K / 32 * 20]`` uint8 as GGUF's Q5_1 stores a
    block's values (0..31): 4 bytes of fifth bits (bit i of their little-endian int32: value i's), then the q4
    types' 16 bytes of low nibbles; q2x16 ``[N, K / 4]`` uint8, four values (0..3) a byte (byte i of a block's 8:
    values i, i + 8, i + 16, i + 24 in bits 0-1, 2-3, 4-5, 6-7); q3x16 ``[N, K / 32 * 12]`` uint8, a block's values
    (0..7) as q2x16's 8 bytes of their two low bits, then 4 bytes of third bits (bit i of their little-endian int32:
    value i's). :meth:`values` unpacks them. ``d``, ``m``: ``[N, K / 32]`` float16 (q6_k's and q3x16's ``d`` and
    q4x16's and q2x16's ``d`` and ``m``: ``[N, K / 16]``; ``m`` is None for q8_0, q6_k, q3x16 and iq4_nl; Q4_0's
    ``w = d (q - 8)`` is stored as ``m = -8 d``, which gives the same values)."""

    qtype: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.q.shape
        kind = _KIND[self.qtype]
        return n, (width * 2 if kind in _NIBBLE_KINDS else width // 20 * BLOCK if kind == _Q5
                   else width * 4 if kind == _Q2X16 else width // 12 * BLOCK if kind == _Q3X16 else width)

    @staticmethod
    def from_values(qtype: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> Blocks:
        """Blocks of the values ``q`` ``[N, K]`` (int8 for q8_0, 0..63 for q6_k, 0..31 for q5_1, 0..15 for q4
        types, q4x16 and iq4_nl, whose values index :data:`IQ4_VALUES`; 0..3 for q2x16, 0..7 for q3x16)."""
        n, k = q.shape
        if _KIND[qtype] in (_Q2X16, _Q3X16):
            top = 3 if _KIND[qtype] == _Q2X16 else 7
            if q.numel() and (int(q.max()) > top or int(q.min()) < 0):  # (it would spill into the next value)
                raise QuantizationError(f"{qtype} values must be 0..{top}, got {int(q.min())}..{int(q.max())}")
            v = q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
            packed = _pack_two_bits(v & 3)  # [n, nb, 8]
            if top == 3:
                return Blocks(qtype, packed.reshape(n, k // 4), d, m)
            # then the third bits: byte j of 4, bit i: value 8 j + i (an int32's little-endian bytes)
            return Blocks(qtype, torch.cat([packed, _pack_bits(v >> 2)], dim=-1).view(n, k // BLOCK * 12), d, m)
        if _KIND[qtype] == _Q5:
            if q.numel() and int(q.max()) > 31:  # (a sixth bit would spill into the next value's fifth)
                raise QuantizationError(f"q5_1 values must be 0..31, got {int(q.max())}")
            v = q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
            # fifth bits: byte j of 4, bit i: value 8 j + i (an int32's little-endian bytes)
            high = _pack_bits(v >> 4)
            low = v & 0xF
            packed = torch.cat([high, low[..., :16] | (low[..., 16:] << 4)], dim=-1)
            return Blocks(qtype, packed.view(n, k // BLOCK * 20), d, m)
        if _KIND[qtype] not in _NIBBLE_KINDS:
            return Blocks(qtype, q, d, m)
        if q.numel() and int(q.max()) > 15:  # (it would spill into the byte's other value)
            raise QuantizationError(f"{qtype} values must be 0..15, got {int(q.max())}")
        halves = q.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
        return Blocks(qtype, (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(n, k // 2), d, m)

    def values(self) -> torch.Tensor:
        """``q`` one value an element, ``[N, K]``: int8 for q8_0, uint8 0..63 for q6_k, 0..31 for q5_1, 0..15 for
        q4 types, q4x16 and iq4_nl, 0..3 for q2x16, 0..7 for q3x16."""
        n, k = self.shape
        if _KIND[self.qtype] == _Q2X16:
            return _unpack_two_bits(self.q.view(n, k // BLOCK, 8)).view(n, k)
        if _KIND[self.qtype] == _Q3X16:
            b = self.q.view(n, k // BLOCK, 12)
            return (_unpack_two_bits(b[..., :8]) | (_unpack_bits(b[..., 8:]) << 2)).view(n, k)
        if _KIND[self.qtype] == _Q5:
            b = self.q.view(n, k // BLOCK, 20)
            return _five_bits(b[..., 4:], b[..., :4]).view(n, k)
        if _KIND[self.qtype] not in _NIBBLE_KINDS:
            return self.q
        b = self.q.view(n, k // BLOCK, 1, BLOCK // 2)
        return torch.cat([b & 0xF, b >> 4], dim=2).view(n, k)

    @staticmethod
    def from_gguf(raw: np.ndarray | torch.Tensor, qtype: str, k: int) -> Blocks:
        """A GGUF tensor's rows of blocks, ``[N, K / block weights * block bytes]`` uint8 (``GGUFReader``'s
        ``data``), ``qtype`` its GGUF type (lower case). Q4_0, Q4_1, Q5_1, Q8_0 and IQ4_NL are kept as stored, Q6_K
        unpacked; the types of :data:`GGUF_CONVERTED` are read into the kind named there (Q3_K into q3x16
        and Q2_K into q2x16, chunkattn's), a slice of rows at a time."""
        if qtype not in _GGUF_BLOCK_BYTES:
            raise QuantizationError(f"GGUF type {qtype} is not read into blocks (supported: "
                                    f"{', '.join(_GGUF_BLOCK_BYTES)})")
        if isinstance(raw, np.ndarray):  # (a copy only of a read-only array: a file's memory map)
            raw = np.asarray(raw, dtype=np.uint8)
            data = torch.from_numpy(raw if raw.flags.writeable else raw.copy())
        else:
            data = raw.contiguous()
        n, size = data.shape[0], _GGUF_BLOCK_WEIGHTS.get(qtype, BLOCK)
        nb = k // size
        if k % size or data.dim() != 2 or data.shape[1] != nb * _GGUF_BLOCK_BYTES[qtype]:
            raise QuantizationError(f"a {qtype} tensor with K = {k} must be [N, {nb * _GGUF_BLOCK_BYTES[qtype]}] "
                                    f"bytes, got {list(data.shape)}")
        if qtype in _CONVERT:
            convert, size = _CONVERT[qtype], _GGUF_BLOCK_BYTES[qtype]
            return _by_slices(GGUF_CONVERTED.get(qtype, qtype), n, k,
                              lambda start, stop: convert(data[start:stop].view(-1, nb, size)))
        blocks = data.view(n, nb, _GGUF_BLOCK_BYTES[qtype])
        d = blocks[..., 0:2].contiguous().view(torch.float16).view(n, nb)
        if qtype == "q8_0":
            return Blocks(qtype, blocks[..., 2:].contiguous().view(torch.int8).view(n, k), d, None)
        start = 4 if qtype == "q4_1" else 2
        q = blocks[..., start:start + 16].contiguous().view(n, k // 2)  # (GGUF's nibble order, kept)
        if qtype == "q4_1":
            m = blocks[..., 2:4].contiguous().view(torch.float16).view(n, nb)
        else:
            m = d * -8  # exact in float16 unless |d| > 8188 (checked)
            if not torch.isfinite(m).all():
                raise QuantizationError("a Q4_0 scale too large to store its offset -8 d in float16")
        return Blocks(qtype, q, d, m)

    @staticmethod
    def empty(qtype: str, n: int, k: int) -> Blocks:
        """Uninitialised blocks of an ``[N, K]`` weight."""
        kind, size = _KIND[qtype], _SCALE_BLOCK.get(qtype, BLOCK)
        q = torch.empty(n, k // 2 if kind in _NIBBLE_KINDS else k // BLOCK * 20 if kind == _Q5 else k // 4
                        if kind == _Q2X16 else k // BLOCK * 12 if kind == _Q3X16 else k,
                        dtype=torch.int8 if qtype == "q8_0" else torch.uint8)
        return Blocks(qtype, q, torch.empty(n, k // size, dtype=torch.float16),
                      torch.empty(n, k // size, dtype=torch.float16) if kind in _OFFSET_KINDS else None)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``: GGUF's reference values (``d q + m`` in float32, the product exact)."""
        n, k = self.shape
        size = _SCALE_BLOCK.get(self.qtype, BLOCK)
        q = self.values().view(n, k // size, size).float()
        if self.qtype == "iq4_nl":
            q = torch.tensor(IQ4_VALUES, dtype=torch.float32)[q.long()]
        w = (q - 32 if self.qtype == "q6_k" else q - 4 if self.qtype == "q3x16" else q) * self.d.float()[..., None]
        if self.m is not None:
            w = w + self.m.float()[..., None]
        return w.view(n, k)

    @staticmethod
    def nbytes_of(numel: int, qtype: str) -> int:
        """Bytes of the blocks of ``numel`` weights: ``q`` a byte (q8_0, q6_k), 5/8 of a byte (q5_1), half a
        byte (q4 types, iq4_nl, q4x16), 3/8 (q3x16) or a quarter (q2x16) per weight, ``d`` (and ``m``) two bytes per
        32 (q6_k and the x16 types: per 16)."""
        if _KIND[qtype] == _Q3X16:
            return numel // BLOCK * 12 + numel // 16 * 2
        if _KIND[qtype] == _Q4X16:
            return numel // 2 + numel // 16 * 4
        if _KIND[qtype] == _Q2X16:
            return numel // 4 + numel // 16 * 4
        if _KIND[qtype] == _Q4:
            return numel // 2 + numel // BLOCK * 4
        if _KIND[qtype] == _IQ4:
            return numel // 2 + numel // BLOCK * 2
        if _KIND[qtype] == _Q5:
            return numel // BLOCK * (20 + 4)
        return numel + numel // _SCALE_BLOCK.get(qtype, BLOCK) * 2

    @staticmethod
    def cat(parts: list[Blocks], widen: bool = False) -> Blocks:
        """Blocks of the same kind stacked along N (a fused projection of separately stored ones). ``widen``: q2x16
        parts beside q3x16 (or q4x16) ones are stacked as q4x16 (the same values: q3x16's offset -4 d stored), for
        a projection that must be one product (gate/up; q/k/v keep their parts as stored instead:
        :class:`BlockParts`)."""
        kinds = {_KIND[p.qtype] for p in parts}
        if widen and len(kinds) > 1 and kinds <= {_Q2X16, _Q3X16, _Q4X16}:
            parts = [p if p.qtype == "q4x16" else p.as_q4x16() for p in parts]
        kinds = {_KIND[p.qtype] for p in parts}
        if len(kinds) != 1:
            raise QuantizationError(f"cannot fuse {[p.qtype for p in parts]}: different kinds")
        qtype = parts[0].qtype if len({p.qtype for p in parts}) == 1 else "q4_1"
        m = None if parts[0].m is None else torch.cat([p.m for p in parts if p.m is not None])
        return Blocks(qtype, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)

    def as_q4x16(self) -> Blocks:
        """q2x16 / q3x16 blocks as q4x16 blocks of the same values (q3x16's offset ``-4 d`` exact in float16 unless
        ``|d| > 16376``: refused)."""
        if self.qtype == "q3x16":
            m = self.d * -4
            if not torch.isfinite(m).all():
                raise QuantizationError("a q3x16 scale too large to store its offset -4 d in float16 (as q4x16)")
            return Blocks.from_values("q4x16", self.values(), self.d, m)
        if self.qtype != "q2x16":
            raise QuantizationError(f"{self.qtype} blocks are not widened to q4x16")
        return Blocks.from_values("q4x16", self.values(), self.d, self.m)

    def slice(self, start: int, stop: int) -> Blocks:
        """Rows ``start .. stop - 1`` (views)."""
        return Blocks(self.qtype, self.q[start:stop], self.d[start:stop],
                      None if self.m is None else self.m[start:stop])

    def permute_rows(self, order: torch.Tensor) -> Blocks:
        return Blocks(self.qtype, self.q[order], self.d[order], None if self.m is None else self.m[order])


def _from_q5_0(b: torch.Tensor) -> Blocks:
    """Q5_0 blocks ``[n, nb, 22]`` (d, 32 high bits, 16 bytes of low nibbles) as q8_0: the same values."""
    n, nb, _ = b.shape
    d = b[..., 0:2].contiguous().view(torch.float16).view(n, nb)
    q = _five_bits(b[..., 6:22], b[..., 2:6]).to(torch.int8)
    return Blocks("q8_0", (q - 16).view(n, nb * BLOCK), d, None)


def _from_q4_k(b: torch.Tensor) -> Blocks:
    """Q4_K super-blocks ``[n, nb, 144]`` (d, dmin, 12 bytes of 6-bit scales and offsets, 128 bytes of nibbles)
    as q4_1 blocks of 32: ``w = (d sc) q - (dmin m)``, the two products rounded to float16 (see
    :data:`GGUF_CONVERTED`)."""
    n, nb, _ = b.shape
    scale, offset = _k_scales(b)
    qs = b[..., 16:].reshape(n, nb, 4, 1, 32)  # 32 bytes per 64 weights: sub-block 2i low nibbles, 2i + 1 high
    values = torch.cat([qs & 0xF, qs >> 4], dim=3).view(n, nb * 256)
    return Blocks.from_values("q4_1", values, scale, offset)


def _from_q6_k(b: torch.Tensor) -> Blocks:
    """Q6_K super-blocks ``[n, nb, 210]`` (128 bytes of low nibbles, 64 of top two bits, 16 int8 scales, d) as
    q6_k blocks: the 6-bit values as stored, each sub-block of 16's scale ``d sc`` rounded to float16 (GGUF's
    dequantization: ``(d sc) (q - 32)`` in float32)."""
    n, nb, _ = b.shape
    d = b[..., 208:210].contiguous().view(torch.float16).float()  # [n, nb, 1]
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    scale = (d * sc).to(torch.float16).view(n, nb * 16)
    if not torch.isfinite(scale).all():
        raise QuantizationError("a Q6_K scale too large for float16 (or not finite)")
    # each half of 128 weights: 64 bytes of low nibbles and 32 of top bits; value 32 a + l (a = 0..3) has the low
    # (a = 0, 1) or high (a = 2, 3) nibble of byte 32 (a % 2) + l and bits 2a, 2a + 1 of top byte l
    ql = b[..., 0:128].reshape(n, nb, 2, 2, 32)
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=3)
    top = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    return Blocks("q6_k", (low | (top << 4)).view(n, nb * 256), scale, None)


def _from_q5_1(b: torch.Tensor) -> Blocks:
    """Q5_1 blocks ``[n, nb, 24]`` (d, m, 32 fifth bits, 16 bytes of low nibbles) as q5_1 blocks: as stored
    (``w = d q + m``)."""
    n, nb, _ = b.shape
    d = b[..., 0:2].contiguous().view(torch.float16).view(n, nb)
    m = b[..., 2:4].contiguous().view(torch.float16).view(n, nb)
    return Blocks("q5_1", b[..., 4:24].reshape(n, nb * 20), d, m)


def _five_bits(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1's 32 values a block, uint8 ``[.., 32]``: ``low`` ``[.., 16]`` bytes (value i in byte i's low
    nibble, value i + 16 in its high one), ``high`` ``[.., 4]`` bytes (bit i of their little-endian int32: value
    i's fifth bit)."""
    return torch.cat([low & 0xF, low >> 4], dim=-1) | (_unpack_bits(high) << 4)


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[.., n]`` bytes -> ``[.., 8 n]`` values 0 / 1, bit i of byte j being value 8 j + i (the bits of a
    little-endian integer: q5_1's fifth bits, q3x16's third bits)."""
    return ((b[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)


def _pack_bits(v: torch.Tensor) -> torch.Tensor:
    """:func:`_unpack_bits`' inverse: uint8 values 0 / 1 ``[.., 8 n]`` -> ``[.., n]`` bytes."""
    return (v.unflatten(-1, (-1, 8)) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _unpack_two_bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[.., n]`` bytes -> ``[.., 4 n]`` values 0..3, byte i holding value i + n L in bits 2L, 2L + 1 (q2x16's
    blocks and tile groups, q3x16's two low bits, q6's top bits, Q2_K's and Q3_K's 32-byte runs)."""
    return ((b[..., None, :] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3).flatten(-2)


def _pack_two_bits(v: torch.Tensor) -> torch.Tensor:
    """:func:`_unpack_two_bits`' inverse: uint8 values 0..3 ``[.., 4 n]`` -> ``[.., n]`` bytes."""
    q = v.unflatten(-1, (4, -1))
    return q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K super-blocks' 8 sub-blocks' scales ``d sc`` and offsets ``-dmin m``, float16 ``[n, nb * 8]``
    (their float32 products rounded: see :data:`GGUF_CONVERTED`)."""
    n, nb, _ = b.shape
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [n, nb, 1]
    dmin = b[..., 2:4].contiguous().view(torch.float16).float()
    s = b[..., 4:16].to(torch.int32)
    # sub-block j's 6-bit scale and offset (GGUF's get_scale_min_k4): j < 4 in the low 6 bits of bytes j and
    # j + 4; j >= 4 split, 4 bits in byte j + 4 and 2 in the top bits of bytes j - 4 and j
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    scale = (d * sc.float()).to(torch.float16).view(n, nb * 8)
    offset = (-(dmin * mn.float())).to(torch.float16).view(n, nb * 8)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise QuantizationError("a K-quant scale too large for float16 (or not finite)")
    return scale, offset


def _from_q5_k(b: torch.Tensor) -> Blocks:
    """Q5_K super-blocks ``[n, nb, 176]`` (d, dmin, 12 bytes of 6-bit scales and offsets, 32 bytes of fifth bits,
    128 bytes of nibbles) as q5_1 blocks of 32: ``w = (d sc) q - (dmin m)``, the products rounded to float16 as
    Q4_K's are."""
    n, nb, _ = b.shape
    scale, offset = _k_scales(b)
    # sub-block j: value l's low 4 bits in byte 32 (j // 2) + l of the nibbles (low nibble for even j, high for
    # odd), its fifth bit bit j of byte l of the 32
    qs = b[..., 48:].reshape(n, nb, 4, 1, 32)
    low = torch.cat([qs & 0xF, qs >> 4], dim=3).view(n, nb, 8, 32)
    high = (b[..., 16:48].reshape(n, nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1
    return Blocks.from_values("q5_1", (low | (high << 4)).view(n, nb * 256), scale, offset)


def _from_q3_k(b: torch.Tensor) -> Blocks:
    """Q3_K super-blocks ``[n, nb, 110]`` (32 bytes of third bits, 64 of 2-bit values, 12 of 6-bit scales, d) as
    q3x16 blocks: ``w = (d (sc - 32)) q``, q in -4..3 (its two low bits, minus 4 where the third bit is clear), held
    as ``q + 4`` with each sub-block of 16's scale product rounded to float16 (GGUF's dequantization: the product
    in float32)."""
    n, nb, _ = b.shape
    d = b[..., 108:110].contiguous().view(torch.float16).float()  # [n, nb, 1]
    s = b[..., 96:108]
    # sub-block j's scale: low 4 bits from byte j (j < 8) or byte j - 8's high nibble; top 2 from byte 8 + j % 4,
    # bits 2 (j // 4)
    low = torch.cat([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], dim=-1)
    high = (s[..., None, 8:12] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    sc = (low | (high.reshape(n, nb, 16) << 4)).float() - 32
    scale = (d * sc).to(torch.float16).view(n, nb * 16)
    if not torch.isfinite(scale).all():
        raise QuantizationError("a Q3_K scale too large for float16 (or not finite)")
    # value v of 256: its 2 bits in byte 32 (v // 128) + v % 32 at bits 2 ((v // 32) % 4); third bit v // 32 of
    # byte v % 32
    ql = _unpack_two_bits(b[..., 32:96].reshape(n, nb, 2, 32))
    qh = (b[..., 0:32].reshape(n, nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1
    values = ql.reshape(n, nb, 256) + (qh.reshape(n, nb, 256) << 2)  # q + 4
    return Blocks.from_values("q3x16", values.view(n, nb * 256), scale, None)


def _from_q2_k(b: torch.Tensor) -> Blocks:
    """Q2_K super-blocks ``[n, nb, 84]`` (16 bytes of 4-bit scales and offsets, 64 of 2-bit values, d, dmin) as
    q2x16 blocks: ``w = (d sc) q - (dmin m)``, q in 0..3, sub-block j's ``sc`` and ``m`` the low and high nibble
    of its byte, both products rounded to float16 (as Q4_K's: see :data:`GGUF_CONVERTED`)."""
    n, nb, _ = b.shape
    s = b[..., 0:16].to(torch.int32)
    d = b[..., 80:82].contiguous().view(torch.float16).float()  # [n, nb, 1]
    dmin = b[..., 82:84].contiguous().view(torch.float16).float()
    scale = (d * (s & 0xF).float()).to(torch.float16).view(n, nb * 16)
    offset = (-(dmin * (s >> 4).float())).to(torch.float16).view(n, nb * 16)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise QuantizationError("a Q2_K scale too large for float16 (or not finite)")
    # value v of 256: bits 2 ((v // 32) % 4) of byte 32 (v // 128) + v % 32
    q = _unpack_two_bits(b[..., 16:80].reshape(n, nb, 2, 32))
    return Blocks.from_values("q2x16", q.reshape(n, nb * 256), scale, offset)


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL / IQ4_XS's codebook


def _from_iq4_nl(b: torch.Tensor) -> Blocks:
    """IQ4_NL blocks ``[n, nb, 18]`` (d, 16 bytes of codebook indices: byte i holds value i's in its low nibble,
    value i + 16's in its high one, the q4 types' order) as stored: ``w = d IQ4_VALUES[q]``."""
    n, nb, _ = b.shape
    d = b[..., 0:2].contiguous().view(torch.float16).view(n, nb)
    return Blocks("iq4_nl", b[..., 2:18].reshape(n, nb * 16), d, None)


def _from_iq4_xs(b: torch.Tensor) -> Blocks:
    """IQ4_XS super-blocks ``[n, nb, 136]`` (d, 8 sub-blocks' 6-bit scales as 2 high bits in a uint16 and 4 low
    in 4 bytes, 128 bytes of codebook indices) as iq4_nl blocks of 32: ``w = (d (ls - 32)) IQ4_VALUES[q]``, the
    scale product rounded to float16."""
    n, nb, _ = b.shape
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [n, nb, 1]
    high = (b[..., 2:4].contiguous().view(torch.int16).to(torch.int32) >> (2 * torch.arange(8))) & 3  # [n, nb, 8]
    low = torch.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], dim=-1).reshape(n, nb, 8)
    scale = (d * ((low.to(torch.int32) | (high << 4)).float() - 32)).to(torch.float16).view(n, nb * 8)
    if not torch.isfinite(scale).all():
        raise QuantizationError("an IQ4_XS scale too large for float16 (or not finite)")
    return Blocks("iq4_nl", b[..., 8:].reshape(n, nb * 128), scale, None)


_CONVERT = {"q5_0": _from_q5_0, "q4_k": _from_q4_k, "q6_k": _from_q6_k, "q5_1": _from_q5_1, "q5_k": _from_q5_k,
            "q3_k": _from_q3_k, "q2_k": _from_q2_k, "iq4_nl": _from_iq4_nl, "iq4_xs": _from_iq4_xs}


QUANTIZE_SLICE = 1 << 24  # weights :func:`quantize` takes at a time
PACK_GROUP_BYTES = 1 << 26  # weights (bytes of int8 q) :meth:`QuantizedWeight.pack` packs at a time


def quantize(w: torch.Tensor | Callable[[int, int], torch.Tensor], qtype: str,
             shape: tuple[int, int] | None = None) -> Blocks:
    """A float weight ``[N, K]`` (K a multiple of 32) as blocks, round to nearest: q8_0 ``d = max|w| / 127``;
    q4_1 ``d = (max - min) / 15, m = min``; q4_0 ``d = -w_absmax / 8`` (llama.cpp's choices). The scales are
    rounded to float16 first, so ``q`` is chosen for the scale that is stored.

    The weight is taken a slice of rows at a time (float32 temporaries of ~64 MiB, not of its size), into blocks
    allocated once. ``w`` may be a function ``w(start, stop)`` returning rows ``start .. stop - 1``, with ``shape``
    the weight's: then the whole weight is never held (a checkpoint's tensor read a slice at a time)."""
    if qtype not in QTYPES:
        raise QuantizationError(f"unknown quantization {qtype!r}; choose one of {', '.join(QTYPES)}")
    dims: tuple[int, ...] | None = tuple(w.shape) if isinstance(w, torch.Tensor) else shape
    read = functools.partial(_rows, w) if isinstance(w, torch.Tensor) else w
    if dims is None or len(dims) != 2 or dims[1] % BLOCK:
        raise QuantizationError(f"quantizing needs a [N, K] weight with K a multiple of {BLOCK}, got "
                                f"{None if dims is None else list(dims)}")
    n, k = dims

    def part(start: int, stop: int) -> Blocks:
        x = read(start, stop)
        if tuple(x.shape) != (stop - start, k):  # (a reader's rows, never broadcast into the blocks)
            raise QuantizationError(f"rows {start}..{stop - 1} of a [{n}, {k}] weight came as {list(x.shape)}")
        return _quantize_slice(x.detach(), qtype)

    return _by_slices(qtype, n, k, part)


def _by_slices(qtype: str, n: int, k: int, part: Callable[[int, int], Blocks]) -> Blocks:
    """The blocks of an ``[N, K]`` weight made a slice of rows (:data:`QUANTIZE_SLICE` weights) at a time,
    ``part(start, stop)`` giving those rows' blocks, into blocks allocated once."""
    out = Blocks.empty(qtype, n, k)
    rows = max(1, QUANTIZE_SLICE // k)
    for i in range(0, n, rows):
        got = part(i, min(i + rows, n))
        out.q[i:i + rows], out.d[i:i + rows] = got.q, got.d
        if out.m is not None and got.m is not None:
            out.m[i:i + rows] = got.m
    return out


def _rows(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return w[start:stop]


def _quantize_slice(w: torch.Tensor, qtype: str) -> Blocks:
    n, k = w.shape
    x = w.float().reshape(n, k // BLOCK, BLOCK)

    def inverse(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1.0 / d.float())[..., None]

    if qtype == "q8_0":
        d = (x.abs().amax(-1) / 127).to(torch.float16)
        q = (x * inverse(d)).round().clamp(-127, 127).to(torch.int8)
        return Blocks(qtype, q.view(n, k), d, None)
    if qtype == "q4_1":
        lo, hi = x.amin(-1), x.amax(-1)
        d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
        q = ((x - m.float()[..., None]) * inverse(d)).round().clamp(0, 15).to(torch.uint8)
        return Blocks.from_values(qtype, q.view(n, k), d, m)
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
    d = (signed_max / -8).to(torch.float16)
    q = (x * inverse(d) + 8).round().clamp(0, 15).to(torch.uint8)
    return Blocks.from_values(qtype, q.view(n, k), d, d * -8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A layer's weight packed for ``chunkattn_layers.linear_quant`` (see ``csrc/linear_quant.cpp`` for the
    layout): panels of 32 output columns, or, ``gate_up``, of 16 gate and the same 16 up columns (the MLP's
    fused ``silu(gate) * up``)."""

    qtype: str
    packed: torch.Tensor  # uint8 [P, K / 32, 2, tile bytes]
    out_features: int
    in_features: int
    gate_up: bool = False

    @property
    def kind(self) -> int:
        return _KIND[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    @staticmethod
    def pack(blocks: Blocks, gate_up: bool = False) -> QuantizedWeight:
        n, k = blocks.shape
        if gate_up and n % 2:
            raise QuantizationError(f"a gate/up weight must be [2 I, K], got {[n, k]}")
        # a group of panels at a time: the copies packing makes are of a group's rows, not of the whole weight
        # (the Llama-3.1-8B embeddings' int8 values are 0.5 GiB)
        panels, group = _panels(n, gate_up), max(1, PACK_GROUP_BYTES // (32 * k))
        if panels <= group:
            packed = _pack_panels(blocks, gate_up)
        else:
            packed = torch.empty(panels, k // BLOCK, 2, _TILE_BYTES[_KIND[blocks.qtype]], dtype=torch.uint8)
            half = n // 2
            for p0 in range(0, panels, group):
                if gate_up:  # panel p: gate rows 16p .. 16p + 15 and the same up rows
                    lo, hi = 16 * p0, min(16 * (p0 + group), half)
                    rows = Blocks.cat([blocks.slice(lo, hi), blocks.slice(half + lo, half + hi)])
                else:
                    rows = blocks.slice(32 * p0, min(32 * (p0 + group), n))
                packed[p0:p0 + group] = _pack_panels(rows, gate_up)
        return QuantizedWeight(blocks.qtype, packed, n // 2 if gate_up else n, k, gate_up)


    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), K]``: rows of the weight (``[gate; up]`` order for ``gate_up``), dequantized as
        the kernel does before its bf16 rounding (an embedding lookup; the reference in tests)."""
        n = 2 * self.out_features if self.gate_up else self.out_features
        rows = rows.long().cpu()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise IndexError(f"row index out of range: rows must be in [0, {n}), got {int(rows.min())} .. "
                             f"{int(rows.max())}")
        p, j, c = _panel_positions(n, self.gate_up, rows)
        tiles = self.packed[p, :, j]  # [R, S, tile bytes]
        r, steps = len(rows), self.packed.shape[1]
        d = tiles[..., :32].contiguous().view(torch.float16).view(r, steps, 16)
        pick = c.view(r, 1, 1).expand(r, steps, 1)
        scale = d.gather(2, pick).float()  # [R, S, 1]
        if self.kind in (_Q4, _Q5, _IQ4):  # nibbles, after the offsets m where the kind has them
            m = None
            if self.kind in _OFFSET_KINDS:
                m = tiles[..., 32:64].contiguous().view(torch.float16).view(r, steps, 16).gather(2, pick).float()
            start = 64 if m is not None else 32
            b = tiles[..., start:start + 256].reshape(r, steps, 16, 16)
            e = torch.cat([b & 0xF, b >> 4], dim=-1)  # [R, S, 16 r, 32 e]
            if self.kind == _Q5:  # fifth bits: group g's byte 4n + L, bit i: row 4g + L, value 8n + i
                top = tiles[..., 320:].reshape(r, steps, 4, 4, 4, 1)  # [.., g, n, L, 1]
                bits = (top >> torch.arange(8, dtype=torch.uint8)) & 1  # [.., g, n, L, i]
                e = e | (bits.permute(0, 1, 2, 4, 3, 5).reshape(r, steps, 16, 32) << 4)
            elif self.kind == _IQ4:  # codebook values
                e = torch.tensor(IQ4_VALUES, dtype=torch.int8)[e.long()]
        elif self.kind in _PER16_KINDS:  # k 0-15 take the first scales, 16-31 the second
            def halves(at: int) -> torch.Tensor:  # [R, S, 32]: the half block's scale (or offset) of each k
                two = tiles[..., at:at + 64].contiguous().view(torch.float16).view(r, steps, 2, 16)
                one = two.gather(3, pick[..., None].expand(r, steps, 2, 1)).float().view(r, steps, 2)
                return one.repeat_interleave(16, dim=2)
            scale = halves(0)
            if self.kind == _Q6:  # w = d (q - 32): groups of 32 bytes of nibbles and 16 of top bits
                m, g = -32 * scale, tiles[..., 64:].reshape(r, steps, 8, 48)
            elif self.kind == _Q3X16:  # w = d (q - 4): groups of 16 bytes of 2-bit values and 8 of third bits
                m, g = -4 * scale, tiles[..., 64:].reshape(r, steps, 8, 24)
            else:  # w = d q + m: groups of 32 bytes of nibbles (q2x16: 16 bytes of 2-bit values)
                m = halves(64)
                g = tiles[..., 128:].reshape(r, steps, 8, 32 if self.kind == _Q4X16 else 16)
            if self.kind in (_Q2X16, _Q3X16):  # byte i: value 16 L + i in bits 2L, 2L + 1
                v = _unpack_two_bits(g[..., :16])  # [R, S, 8, 64]
                if self.kind == _Q3X16:  # byte j of the third bits, bit i: value 8 j + i
                    v = v | (_unpack_bits(g[..., 16:]) << 2)
            else:  # byte i: value i in the low nibble, value i + 32 in the high one
                nib = g[..., :32]
                v = torch.cat([nib & 0xF, nib >> 4], dim=-1)  # [R, S, 8, 64]
            if self.kind == _Q6:
                v = v | (_unpack_two_bits(g[..., 32:]) << 4)  # top bits: byte i, value 16 L + i
            e = v.reshape(r, steps, 16, 32)
        else:
            m = None
            e = tiles[..., 32:].contiguous().view(torch.int8).reshape(r, steps, 16, 32)
        cols = (2 * c).view(r, 1, 1, 1) + torch.arange(2).view(1, 1, 1, 2)
        q = e.gather(3, cols.expand(r, steps, 16, 2)).reshape(r, steps, BLOCK).float()
        w = q * scale if m is None else q * scale + m  # (q6, q3x16: d q - 32 d / - 4 d exact; x16 kinds: d q exact)
        return w.reshape(r, self.in_features)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`rows` (same values) by the native kernels where they are built: an embedding lookup, which
        :meth:`rows`' gathers made ~13% of a 2048-token prefill step."""
        if self.gate_up or not native.available():
            return self.rows(rows)
        n = self.out_features
        try:
            return torch.ops.chunkattn_layers.embedding_quant(self.packed, self.kind, rows.long().cpu(), n)
        except IndexError as exc:  # out of range: the same error as rows() (and nn.Embedding)
            raise IndexError(str(exc).splitlines()[0]) from None

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``, the whole weight (``[gate; up]`` for ``gate_up``)."""
        n = 2 * self.out_features if self.gate_up else self.out_features
        return self.rows(torch.arange(n))

    def auto_path(self, rows: int) -> int:
        """The path :meth:`linear`'s ``path=0`` takes for ``rows`` rows of x on this CPU (1-4, as ``path``):
        direct or x as integers up to a number of rows that depends on the kind and on AMX, then AMX tiles or the
        vector path (``csrc/linear_quant.cpp``'s ``auto_path``, whose comments give the measurements)."""
        return auto_path(self.kind, rows)

    @staticmethod
    def kernel_runs(x: torch.Tensor) -> bool:
        """Whether :meth:`linear` of ``x`` runs the quantized kernel (bfloat16 CPU ``x``, :func:`kernel_supported`)
        rather than the dequantized weight."""
        return x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernel_supported()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, path: int = 0) -> torch.Tensor:
        """``x W^T (+ bias)`` (``silu(x W_gate^T) * x W_up^T`` for ``gate_up``). bfloat16 CPU ``x`` on a CPU with
        AVX512-BF16 runs the kernel (``path``: 0 its choice, 1 AMX tiles, 2 vdpbf16ps on the dequantized panel,
        3 direct from the stored integers, 4 x as 15-bit integers by vpdpbusd; :meth:`auto_path` says which
        path 0 takes); anything else multiplies by the dequantized weight (slow: a warning says so once)."""
        if self.kernel_runs(x):
            ops = torch.ops.chunkattn_layers
            x = x if x.stride(-1) == 1 else x.contiguous()
            if self.gate_up:
                return ops.linear_silu_mul_quant(x, self.packed, self.kind, self.out_features, path)
            return ops.linear_quant(x, self.packed, self.kind, self.out_features, bias, path)
        _warn_dense_fallback(str(x.dtype), x.device.type)
        y = nn.functional.linear(x, self.dequantize().to(device=x.device, dtype=x.dtype), None)
        if self.gate_up:
            half = self.out_features
            return nn.functional.silu(y[:, :half]) * y[:, half:]
        return y if bias is None else y + bias


@dataclass(frozen=True)
class BlockParts:
    """The blocks of a fused projection's parts (q / k / v) when they are of different kinds, stacked along N in
    order (a Q4_K_M file's Q4_K q and k beside a Q6_K v): packed as :class:`QuantizedParts`, each part multiplied
    as stored instead of the whole projection dequantized."""

    parts: tuple[Blocks, ...]

    @staticmethod
    def of(parts: list[Blocks]) -> BlockParts:
        """``parts`` with each run of neighbours of one kind stacked into one part (q and k of Q4_K: one product)."""
        runs: list[list[Blocks]] = []
        for p in parts:
            if runs and _KIND[runs[-1][-1].qtype] == _KIND[p.qtype]:
                runs[-1].append(p)
            else:
                runs.append([p])
        return BlockParts(tuple(Blocks.cat(r) if len(r) > 1 else r[0] for r in runs))

    @property
    def qtype(self) -> str:
        return "+".join(p.qtype for p in self.parts)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


@dataclass(frozen=True)
class QuantizedParts:
    """:class:`BlockParts` packed: a :class:`QuantizedWeight` a part, multiplied apart into the columns of one
    output (``chunkattn_layers.DecoderStack.add_linear_parts`` does the same in the native layer loop). Not for a
    gate/up projection (its activation pairs columns across the parts)."""

    parts: tuple[QuantizedWeight, ...]
    gate_up: bool = False

    @property
    def qtype(self) -> str:
        return "+".join(p.qtype for p in self.parts)

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    kernel_runs = staticmethod(QuantizedWeight.kernel_runs)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``, the parts stacked."""
        return torch.cat([p.dequantize() for p in self.parts])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), K]``: rows of the stacked weight (the reference in tests)."""
        return self.dequantize()[rows.long().cpu()]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, path: int = 0) -> torch.Tensor:
        """Each part's :meth:`QuantizedWeight.linear` (with its slice of ``bias``), concatenated."""
        outs, start = [], 0
        for p in self.parts:
            outs.append(p.linear(x, None if bias is None else bias[start:start + p.out_features], path))
            start += p.out_features
        return torch.cat(outs, dim=-1)


def pack(blocks: Blocks | BlockParts, gate_up: bool = False) -> QuantizedWeight | QuantizedParts:
    """``blocks`` packed for a layer: :meth:`QuantizedWeight.pack`, or a pack a part for :class:`BlockParts`."""
    if isinstance(blocks, Blocks):
        return QuantizedWeight.pack(blocks, gate_up)
    if gate_up:
        raise QuantizationError(f"a gate/up projection's parts must be of one kind, got {blocks.qtype}")
    return QuantizedParts(tuple(QuantizedWeight.pack(p) for p in blocks.parts))


@functools.cache
def _warn_dense_fallback(dtype: str, device: str) -> None:
    log.warning("quantized weights multiplied by dequantizing them on every call (%s on %s: the kernel needs "
                "bfloat16 on a CPU with AVX512-BF16); load with --quantization none to dequantize once",
                dtype, device)


def _pack_panels(blocks: Blocks, gate_up: bool) -> torch.Tensor:
    """The packed panels of ``blocks`` (see :class:`QuantizedWeight`)."""
    n, k = blocks.shape
    p, j, c = _panel_positions(n, gate_up, torch.arange(n))
    panels, steps = _panels(n, gate_up), k // BLOCK
    per = BLOCK // _SCALE_BLOCK.get(blocks.qtype, BLOCK)  # scales a block
    q = torch.zeros(panels, 2, 16, k, dtype=torch.int8 if blocks.qtype == "q8_0" else torch.uint8)
    d = torch.zeros(panels, 2, 16, steps * per, dtype=torch.float16)
    q[p, j, c], d[p, j, c] = blocks.values(), blocks.d
    # [P, 2, 16 c, S, 16 r, 2 t] -> [P, S, 2, 16 r, 16 c, 2 t]: row r of a tile holds e = 2 c + t
    e = q.view(panels, 2, 16, steps, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(panels, steps, 2, 16, 32)
    # [P, 2, 16 c, S, per] -> [P, S, 2, per, 16 c]
    scales = [d.view(panels, 2, 16, steps, per).permute(0, 3, 1, 4, 2).contiguous().view(torch.uint8)
              .view(panels, steps, 2, 32 * per)]
    if _KIND[blocks.qtype] in _PER16_KINDS:  # group g: rows 2g, 2g + 1 (64 values)
        v = e.reshape(panels, steps, 2, 8, 64)
        nib = (v[..., :32] & 0xF) | ((v[..., 32:] & 0xF) << 4)  # 32 bytes of nibbles (q6, q4x16)
        # (2-bit values: 16 bytes, byte i holding value 16 L + i in bits 2L, 2L + 1)
        if blocks.qtype == "q6_k":  # the nibbles, then the top two bits
            values = torch.cat([nib, _pack_two_bits(v >> 4)], dim=-1).reshape(panels, steps, 2, 384)
        elif blocks.qtype == "q3x16":  # the two low bits, then the third bits: byte j, bit i: value 8 j + i
            values = torch.cat([_pack_two_bits(v & 3), _pack_bits((v >> 2) & 1)], dim=-1).reshape(panels, steps, 2, 192)
        else:  # after the offsets m, laid out as the scales: the nibbles (q4x16) or the 2-bit values (q2x16)
            values = (nib if blocks.qtype == "q4x16" else _pack_two_bits(v)).reshape(panels, steps, 2, -1)
            assert blocks.m is not None  # (both have offsets)
            m = torch.zeros(panels, 2, 16, steps * per, dtype=torch.float16)
            m[p, j, c] = blocks.m
            scales.append(m.view(panels, 2, 16, steps, per).permute(0, 3, 1, 4, 2).contiguous().view(torch.uint8)
                          .view(panels, steps, 2, 32 * per))
    elif _KIND[blocks.qtype] in (_Q4, _Q5, _IQ4):  # nibbles two a byte, after the offsets m where the kind has them
        if blocks.m is not None:
            m = torch.zeros(panels, 2, 16, steps, dtype=torch.float16)
            m[p, j, c] = blocks.m
            scales.append(m.permute(0, 3, 1, 2).contiguous().view(torch.uint8).view(panels, steps, 2, 32))
        low = e & 0xF
        values = (low[..., :16] | (low[..., 16:] << 4)).reshape(panels, steps, 2, 256)
        if blocks.qtype == "q5_1":  # fifth bits: group g (rows 4g + L) byte 4n + L, bit i: value 8n + i
            top = (e >> 4).view(panels, steps, 2, 4, 4, 4, 8)  # [.., g, L, n, i]
            bits = (top << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
            values = torch.cat([values, bits.transpose(-1, -2).reshape(panels, steps, 2, 64)], dim=-1)
    else:
        values = e.contiguous().view(torch.uint8).reshape(panels, steps, 2, 512)
    return torch.cat([*scales, values], dim=-1).contiguous()


def _panels(n: int, gate_up: bool) -> int:
    return cdiv(n // 2, 16) if gate_up else cdiv(n, 32)


def _panel_positions(n: int, gate_up: bool, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(panel, tile, column) of each weight row in the pack."""
    if gate_up:
        half = n // 2
        up = rows >= half
        i = torch.where(up, rows - half, rows)
        return i // 16, up.long(), i % 16
    return rows // 32, (rows % 32) // 16, rows % 16
