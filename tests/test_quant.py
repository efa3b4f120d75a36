"""Block-quantized weights (GGUF Q4_0 / Q4_1 / Q8_0) kept as stored: packing, the kernel's paths against float64
references on random inputs, GGUF's own dequantization, and the default model loaded that way."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
import torch

from chunkattn import native
from chunkattn.model import load_model
from chunkattn.model.layers import Embedding, GateUpLinear, Linear
from chunkattn.model.loader import weight_bytes
from chunkattn.model.quant import (
    HELD,
    QTYPES,
    Blocks,
    QuantizationError,
    QuantizedWeight,
    _warn_dense_fallback,
    int_x_supported,
    kernel_supported,
    quantize,
)
from helpers import (
    check_quant_linear,
    int_x,
    int_x_bound,
    int_x_reference,
    iq4_nl_blocks,
    q2x16_blocks,
    q3x16_blocks,
    q4x16_blocks,
    q5_1_blocks,
    q6_k_blocks,
    quant_reference,
    write_checkpoint,
)
from server_helpers import TINY_CONFIG

needs_kernel = pytest.mark.skipif(not kernel_supported(), reason="the quantized kernel needs AVX512-BF16 "
                                  "(and the native build)")
HAS_AMX = native.amx_linear_supported()
# the kernel's paths: 1 AMX tiles, 2 vdpbf16ps on the dequantized panel, 3 direct from the stored integers, 4
# (AVX512-VNNI) x as 15-bit integers
PATHS = ([1] if HAS_AMX else []) + [2, 3]
HAS_INT_X = kernel_supported() and int_x_supported()
needs_int_x = pytest.mark.skipif(not HAS_INT_X, reason="the path with integer x needs AVX512-VNNI (and the "
                                 "quantized kernel)")


def _blocks(w: torch.Tensor, qtype: str) -> Blocks:
    """``w`` as blocks of ``qtype``: :func:`quantize`'s, or for the types read from GGUF files only
    helpers.q6_k_blocks' / q5_1_blocks' / iq4_nl_blocks' / q4x16_blocks' / q2x16_blocks' / q3x16_blocks'."""
    made = {"q6_k": q6_k_blocks, "q5_1": q5_1_blocks, "iq4_nl": iq4_nl_blocks, "q4x16": q4x16_blocks,
            "q2x16": q2x16_blocks, "q3x16": q3x16_blocks}
    return made[qtype](w) if qtype in made else quantize(w, qtype)


@needs_kernel
def test_the_tile_path_runs_exactly_where_the_cpu_has_amx():
    """Says in the test log which paths ran here; the tile path refuses where the CPU has no AMX."""
    print(f"quantized kernel: yes; AMX tiles: {'yes' if HAS_AMX else 'no'}; paths {PATHS}")
    qw = QuantizedWeight.pack(quantize(torch.randn(32, 64), "q4_1"))
    x = torch.randn(2, 64).bfloat16()
    if HAS_AMX:
        assert qw.linear(x, path=1).shape == (2, 32)
    else:
        with pytest.raises(RuntimeError, match="no AMX tiles"):
            qw.linear(x, path=1)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_rounds_to_the_nearest_level(qtype):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(37, 96, generator=gen) * torch.rand(37, 1, generator=gen)
    w[3, :32] = 0  # an all-zero block: scale 0, values 0
    b = quantize(w, qtype)
    deq = b.dequantize()
    step = b.d.float().abs().repeat_interleave(32, dim=1)
    # within half a step (q4_0: one, its levels -8..7 reach only -8 steps toward the block's largest magnitude and
    # +7 away from it), plus the float16 rounding of the scale over up to 16 steps and of q4_1's offset
    half = 1.0 if qtype == "q4_0" else 0.5
    offset = 0 if b.m is None or qtype == "q4_0" else b.m.float().abs().repeat_interleave(32, 1) * 2**-10
    slack = half * step + 16 * step * 2**-10 + offset
    assert ((deq - w).abs() <= slack + 1e-7).all()
    assert torch.equal(deq[3, :32], torch.zeros(32))
    with pytest.raises(QuantizationError, match="multiple of 32"):
        quantize(torch.randn(4, 40), qtype)
    with pytest.raises(QuantizationError, match="unknown quantization"):
        quantize(w, "q5_k")


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_by_slices_of_rows_equals_all_at_once(qtype, monkeypatch):
    """A large weight is quantized a slice of rows at a time (bounded float32 temporaries): the same blocks,
    also from bfloat16 (each slice widened as taken), from a reader of rows and with a last slice shorter than
    the others."""
    from chunkattn.model import quant

    gen = torch.Generator().manual_seed(12)
    w = (torch.randn(53, 128, generator=gen) * torch.rand(53, 1, generator=gen)).bfloat16()
    whole = quantize(w.float(), qtype)
    monkeypatch.setattr(quant, "QUANTIZE_SLICE", 5 * 128 + 17)  # 5 rows a slice: 11 slices, the last of 3
    taken = []

    def read(start, stop):  # rows as a reader hands them (a checkpoint's tensor read a slice at a time)
        taken.append((start, stop))
        return w[start:stop]

    assert quantize(w, qtype).q.shape == quantize(read, qtype, (53, 128)).q.shape
    with pytest.raises(QuantizationError, match=r"rows 0..4 of a \[53, 128\] weight came as \[1, 128\]"):
        quantize(lambda start, stop: w[start:start + 1], qtype, (53, 128))  # (not broadcast over the slice)
    assert taken == [(i, min(i + 5, 53)) for i in range(0, 53, 5)]
    for source in (w, w.float(), read):
        sliced = quantize(source, qtype, (53, 128))
        assert sliced.qtype == whole.qtype and torch.equal(sliced.q, whole.q) and torch.equal(sliced.d, whole.d)
        assert (sliced.m is None) == (whole.m is None) and (whole.m is None or torch.equal(sliced.m, whole.m))


@pytest.mark.parametrize("qtype", HELD)
@pytest.mark.parametrize(("n", "gate_up"), [(200, False), (161, False), (100, True), (66, True)])
def test_pack_by_groups_of_panels_equals_all_at_once(qtype, n, gate_up, monkeypatch):
    """A large weight is packed a group of panels at a time (bounded copies): the same pack, with a last group
    shorter than the others and a last panel partly empty (gate/up: its gate and up rows taken in step)."""
    from chunkattn.model import quant

    gen = torch.Generator().manual_seed(n)
    b = _blocks(torch.randn(n, 96, generator=gen), qtype)
    whole = QuantizedWeight.pack(b, gate_up=gate_up)
    monkeypatch.setattr(quant, "PACK_GROUP_BYTES", 2 * 32 * 96)  # 2 panels a group
    grouped = QuantizedWeight.pack(b, gate_up=gate_up)
    assert grouped.packed.shape == whole.packed.shape and torch.equal(grouped.packed, whole.packed)
    assert (grouped.out_features, grouped.in_features, grouped.gate_up) == (whole.out_features, 96, gate_up)


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_read_gguf_bytes_as_gguf_py_dequantizes_them(qtype):
    gguf = pytest.importorskip("gguf")
    gen = np.random.default_rng(5)
    w = (gen.standard_normal((24, 160)) * 0.05).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
    raw = gguf.quants.quantize(w, kind)  # GGUF's own blocks, [24, 5 * block bytes]
    ref = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    b = Blocks.from_gguf(raw, qtype, 160)
    assert torch.equal(b.dequantize(), ref)
    # q4 values stay two a byte as GGUF stores them: values() unpacks them, from_values() packs them back
    assert b.shape == (24, 160) and b.q.shape == (24, 160 if qtype == "q8_0" else 80)
    values = b.values()
    assert values.shape == (24, 160) and (qtype == "q8_0" or int(values.max()) <= 15)
    assert torch.equal(Blocks.from_values(qtype, values, b.d, b.m).q, b.q)
    assert b.q.numel() + b.d.numel() * 2 + (0 if b.m is None else b.m.numel() * 2) == Blocks.nbytes_of(24 * 160, qtype)
    with pytest.raises(QuantizationError, match="must be"):
        Blocks.from_gguf(raw[:, :-1], qtype, 160)


@needs_kernel
@pytest.mark.parametrize("qtype", HELD)
@pytest.mark.parametrize("n,k,gate_up", [(70, 96, False), (32, 32, False), (64, 576, True), (50, 64, True)])
def test_pack_is_the_amx_panel_layout_of_the_dequantized_weight(qtype, n, k, gate_up):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    b = _blocks(w, qtype)
    qw = QuantizedWeight.pack(b, gate_up=gate_up)
    ref = b.dequantize()
    assert torch.equal(qw.dequantize(), ref)
    rows = torch.tensor([n - 1, 0, n // 2, 1])
    assert torch.equal(qw.rows(rows), ref[rows])
    for bad in (-1, n):  # an embedding lookup out of range raises, as nn.Embedding does
        with pytest.raises(IndexError, match="out of range"):
            qw.rows(torch.tensor([0, bad]))
        with pytest.raises(IndexError, match="out of range"):
            qw.lookup(torch.tensor([0, bad]))
    if not gate_up:  # the native lookup (an embedding's): the same values, bit for bit, for every row
        every = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        assert torch.equal(qw.lookup(every), ref[every])
        assert qw.lookup(torch.empty(0, dtype=torch.long)).shape == (0, k)
    ops = torch.ops.chunkattn_layers
    panels = ops.dequantize_panels(qw.packed, qw.kind)  # the kernel's own dequantization, rounded to bf16
    want = (ops.pack_gate_up_amx if gate_up else ops.pack_linear_amx)(ref.bfloat16())
    # bit for bit, but a zero's sign (q6's d q - 32 d is +0 where (q - 32) d is -0 for a negative scale; iq4's
    # padding columns d = 0 times -127 are -0): the same value
    same = (panels.view(torch.int16) == want.view(torch.int16)) | ((panels == 0) & (want == 0))
    assert bool(same.all())


# (q5, iq4 and the x16 kinds have no path 4: refused, tested below)
INT_X_TYPES = [t for t in HELD if t not in ("q5_1", "iq4_nl", "q4x16", "q2x16", "q3x16")]


@needs_int_x
@pytest.mark.parametrize("qtype", INT_X_TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k,gate_up,bias", [(70, 96, False, True), (48, 576, True, False), (33, 1536, False, False)])
def test_int_x_path_against_its_float64_emulation(qtype, rows, n, k, gate_up, bias):
    """Path 4 multiplies the stored integers exactly by x rounded to 15-bit integers per block: against that
    rounding emulated in float64, on blocks of zeros, tiny values (below the exponent clamp), wide ranges and odd
    shapes."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{qtype} {rows} {n} {k}".encode()))
    blocks = _blocks(torch.randn(n, k, generator=gen) * 0.05, qtype)
    qw = QuantizedWeight.pack(blocks, gate_up=gate_up)
    exact = qw.dequantize()
    x = torch.randn(rows, k, generator=gen)
    x[0, :32] = 0
    x[-1, -32:] *= 1e-35  # 2^-116: below 2^-100, rounded to 0 with the clamped scale
    x[rows // 2, 32:64] *= torch.logspace(-4, 3, 32)  # values 2^7 and more below the block's largest: rounded
    x = x.bfloat16()
    b = (torch.randn(n, generator=gen) * 0.1).bfloat16() if bias and not gate_up else None
    xd = int_x(x)
    ref = int_x_reference(x, blocks, b, gate_up)
    y = qw.linear(x, b, path=4)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = int_x_bound(xd, exact, ref, gate_up)
    assert (err <= bound).all(), float((err - bound).max())
    # the rounding of x is small beside bf16's own: against the product of x itself, within 2^-14 of each block's
    # largest |x| times the block's |w|, plus the same float32 / bf16 slack
    exact_ref = quant_reference(x, exact, b, gate_up)
    if not gate_up:
        x_err = x.double().abs().view(rows, k // 32, 32).amax(-1).repeat_interleave(32, 1) * 2**-14
        assert ((y.double() - exact_ref).abs() <= bound + x_err @ exact.double().abs().T).all()
    if qw.auto_path(rows) == 4:  # the kernel's own choice for a few rows of q8 (q4 and q6: only when asked)
        assert torch.equal(qw.linear(x, b), y)


@needs_int_x
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_int_x_path_rounds_x_half_to_even_on_a_power_of_two_grid(qtype):
    """Exact outputs: column c picks x[c] alone (d = 1, m = 0), so y[c] is x[c] as path 4 rounds it. A block whose
    largest |x| is 2^13 has the grid 1 (ties to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2); one whose largest is 2^-110
    keeps its values (the clamp at 2^-100 makes its grid 2^-113, fine enough for them); one at 2^-120 rounds to 0,
    not to garbage."""
    k = 96
    q = torch.zeros(32, k, dtype=torch.int8 if qtype == "q8_0" else torch.uint8)
    for c in range(31):
        q[c, c] = q[c, 32 + c] = q[c, 64 + c] = 1  # column c: x[c] + x[32 + c] + x[64 + c]
    if qtype == "q4_0":  # w = d q + m with m = -8 d: q = 8 is zero, 9 is one
        q = q + 8
    d = torch.ones(32, k // 32, dtype=torch.float16)
    m = None if qtype == "q8_0" else -8 * d
    qw = QuantizedWeight.pack(Blocks.from_values(qtype, q, d, m))
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.25, -7.75] + [0.0] * 22 + [8192.0])
    x = torch.zeros(1, k)
    x[0, :32] = ties
    x[0, 32:41] = torch.tensor([1.0, 1.5, 1.25, -1.75, 0.5, 0, 0, 0, 0]) * 2.0**-110
    x[0, 63] = 2.0**-110
    x[0, 64:67] = torch.tensor([1.0, -1.0, 0.5]) * 2.0**-120
    x[0, 95] = 2.0**-120
    y = qw.linear(x.bfloat16(), path=4).float()[0]
    want = torch.tensor([0.0, 2, 2, -0.0, -2, -2, 4, 100, -8] + [0.0] * 22)
    want[:9] += x[0, 32:41]  # exact: 2^-110 * (1, 1.5, 1.25, -1.75, 0.5) are multiples of 2^-113
    assert torch.equal(y[:31], want.bfloat16().float()), y[:31]
    ref = int_x_reference(x.bfloat16(), Blocks.from_values(qtype, q, d, m), None, False)
    assert torch.equal(y[:31], ref[0, :31].float().bfloat16().float())


@needs_int_x
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_int_x_path_turns_a_non_finite_block_into_nan_not_a_number(qtype):
    """An Inf or NaN in a row of x makes that row's outputs NaN (its block scale is NaN), never a finite wrong
    value; the other rows are untouched."""
    gen = torch.Generator().manual_seed(5)
    qw = QuantizedWeight.pack(quantize(torch.randn(40, 128, generator=gen), qtype))
    x = torch.randn(3, 128, generator=gen).bfloat16()
    clean = qw.linear(x, path=4)
    x[0, 70] = float("inf")
    x[2, 5] = float("nan")
    y = qw.linear(x, path=4)
    assert y[0].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[1], clean[1])


@needs_kernel
@pytest.mark.parametrize("qtype", HELD)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 17, 33])
@pytest.mark.parametrize("n,k,gate_up,bias", [(70, 96, False, True), (48, 576, True, False), (33, 1536, False, False)])
def test_linear_quant_paths_against_float64(qtype, rows, n, k, gate_up, bias):
    seed = hash((qtype, rows, n, k)) % 2**31
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    blocks = _blocks(w, qtype)
    qw = QuantizedWeight.pack(blocks, gate_up=gate_up)
    exact = qw.dequantize()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    b = (torch.randn(n, generator=gen) * 0.1).bfloat16() if bias and not gate_up else None
    for path in [0, *PATHS] + ([4] if HAS_INT_X and qtype in INT_X_TYPES else []):
        y = qw.linear(x, b, path=path)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n // 2 if gate_up else n)
        check_quant_linear(y, x, blocks, exact, b, gate_up, qw.auto_path(rows) if path == 0 else path)


@pytest.mark.parametrize("qtype", HELD)
@pytest.mark.parametrize("n,k", [(50, 96), (33, 160)])
def test_each_path_reads_each_weight_where_it_is(qtype, n, k):
    """x rows of the identity: each output is one weight, so a value, bit or lane read from the wrong place shows
    as that weight's error (not averaged away in a long sum), at every row count a path takes apart."""
    gen = torch.Generator().manual_seed(n * k)
    blocks = _blocks(torch.randn(n, k, generator=gen) * 0.05, qtype)
    qw = QuantizedWeight.pack(blocks)
    exact = qw.dequantize().double()
    scale = (blocks.d.double().abs().amax(1, keepdim=True) + (0 if blocks.m is None else blocks.m.double().abs()
                                                              .amax(1, keepdim=True)))  # [n, 1]
    for rows in (1, 2, 3, 4, 5):
        cols = torch.randperm(k, generator=gen)[:rows]
        x = torch.zeros(rows, k).index_put_((torch.arange(rows), cols), torch.ones(rows)).bfloat16()
        want = exact[:, cols].T  # [rows, n]
        for path in [0, *PATHS] + ([4] if HAS_INT_X and qtype in INT_X_TYPES else []):
            err = (qw.linear(x, path=path).double() - want).abs()
            # the bf16 output (and the dequantizing paths' bf16 weights), plus float32 sums of a few terms of
            # up to 351 |d|: far below a misplaced value's |d|
            assert (err <= want.abs() * 2**-7 + scale.T * 2**-14).all(), (rows, path, float(err.max()))


@needs_kernel
@pytest.mark.parametrize("qtype", ["q4_1", "q8_0", "q6_k", "q5_1", "iq4_nl", "q4x16", "q2x16", "q3x16"])
def test_many_rows_span_several_row_blocks(qtype, two_threads):
    """650 rows of K = 1536: the vector path's three row blocks (320 rows fit its 1 MB, the last has 10 rows); the
    tile path's row pairs (the last of 10 rows) through groups of 10 dequantized panels (960 KB), two a thread for
    n = 700 (22 panels, 11 a thread on two threads); both against float64."""
    gen = torch.Generator().manual_seed(650)
    for gate_up, n in ((False, 40), (True, 48), (False, 700)):
        w = torch.randn(n, 1536, generator=gen) * 0.05
        qw = QuantizedWeight.pack(_blocks(w, qtype), gate_up=gate_up)
        x = torch.randn(650, 1536, generator=gen).bfloat16()
        ref = quant_reference(x, qw.dequantize().bfloat16().float(), None, gate_up)
        for path in [p for p in PATHS if p != 3]:
            y = qw.linear(x, path=path).double()
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, atol=2e-3 * float(ref.abs().max()), rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("qtype", HELD)
def test_path_0_runs_the_path_the_kernel_reports(qtype):
    """linear(path=0) is bit for bit the path auto_path names at every row count up to 40: the integers (direct,
    or x as integers for q8 where the CPU has VNNI) for the first rows only, then the tiles where the CPU has AMX
    or the vector path; a kind's rows of each path are one run (never back to direct after a dequantizing path)."""
    gen = torch.Generator().manual_seed(len(qtype))
    qw = QuantizedWeight.pack(_blocks(torch.randn(48, 160, generator=gen) * 0.05, qtype))
    chosen = [qw.auto_path(rows) for rows in range(1, 41)]
    print(qtype, {p: chosen.count(p) for p in sorted(set(chosen))})
    last = 0
    for rows, path in enumerate(chosen, 1):
        assert path in ([4] if HAS_INT_X else []) + [3, 1 if HAS_AMX else 2], (rows, path)
        assert {4: 0, 3: 1, 2: 2, 1: 2}[path] >= last, chosen  # integers first, then dequantized
        last = {4: 0, 3: 1, 2: 2, 1: 2}[path]
        x = torch.randn(rows, 160, generator=gen).bfloat16()
        assert torch.equal(qw.linear(x), qw.linear(x, path=path)), (rows, path)
    assert chosen[0] in (3, 4) and chosen[-1] == (1 if HAS_AMX else 2)
    with pytest.raises(RuntimeError, match="kind must be 0 to 7"):
        torch.ops.chunkattn_layers.quant_auto_path(8, 1)


def test_q2x16_parts_fuse_with_q4x16_parts_as_q4x16_only_when_widened():
    """A gate/up of Q2_K and Q3_K parts (q2x16 beside q4x16) can be one q4x16 weight with the same values
    (``widen``: not refused, which would dequantize it); q/k/v keep them as parts (each as stored, q2x16 at 16/32
    bytes a weight); other kinds never mix."""
    from chunkattn.model.quant import BlockParts

    gen = torch.Generator().manual_seed(7)
    two, four = q2x16_blocks(torch.randn(24, 64, generator=gen)), q4x16_blocks(torch.randn(40, 64, generator=gen))
    assert two.q.shape == (24, 16) and Blocks.nbytes_of(24 * 64, "q2x16") == two.q.numel() + 4 * two.d.numel()
    with pytest.raises(QuantizationError, match="different kinds"):
        Blocks.cat([two, four])
    both = Blocks.cat([two, four], widen=True)
    assert both.qtype == "q4x16" and both.shape == (64, 64)
    assert torch.equal(both.dequantize(), torch.cat([two.dequantize(), four.dequantize()]))
    parts = BlockParts.of([two, two, four])
    assert parts.qtype == "q2x16+q4x16" and parts.shape == (88, 64)
    with pytest.raises(QuantizationError, match="different kinds"):
        Blocks.cat([two, q6_k_blocks(torch.randn(8, 64, generator=gen))], widen=True)
    # Q3_K as read (q3x16, 16/32 bytes a weight: no offsets) widens too, its offset -4 d stored
    three = q3x16_blocks(torch.randn(40, 64, generator=gen))
    assert three.q.shape == (40, 24) and three.m is None
    assert Blocks.nbytes_of(40 * 64, "q3x16") == three.q.numel() + 2 * three.d.numel() == 40 * 64 // 2
    with pytest.raises(QuantizationError, match="different kinds"):
        Blocks.cat([two, three])
    both = Blocks.cat([two, three], widen=True)
    assert both.qtype == "q4x16" and torch.equal(both.dequantize(), torch.cat([two.dequantize(), three.dequantize()]))
    assert BlockParts.of([two, two, three]).qtype == "q2x16+q3x16"
    assert Blocks.cat([three, three]).qtype == "q3x16"  # (alike: no widening)
    huge = Blocks("q3x16", three.q[:1], torch.full_like(three.d[:1], 20000.0), None)  # -4 d overflows float16
    with pytest.raises(QuantizationError, match="too large"):
        Blocks.cat([two.slice(0, 1), huge], widen=True)


@needs_kernel
def test_dequantizing_path_equals_the_bf16_panel_linear_on_the_same_weights(two_threads):
    """The dequantizing path (1, AMX tiles, where the CPU has them; else 2, vdpbf16ps) is linear_amx on the
    dequantized bf16 weight: the same products in the same order, bit for bit."""
    path = 1 if HAS_AMX else 2
    gen = torch.Generator().manual_seed(3)
    ops = torch.ops.chunkattn_layers
    # on AMX tiles: 20 rows dequantized step by step beside the tiles; more: whole panels a group at a time,
    # panel-major over blocks of rows up to 128 rows (K = 2048: blocks of 64, groups of 4 panels), row-pair-major
    # above (K = 576: groups of 28); n = 1000 gives each of two threads 16 panels, the last partial, n = 2000 two
    # groups a thread. By vdpbf16ps: passes of 4 rows (quantized) against passes of 8 + 4 (bf16), the same sums
    cases = [(q, r, 96, 576) for q in HELD for r in (20, 40)]
    cases += [("q4_1", 100, 600, 2048), ("q4_1", 150, 1000, 576), ("q8_0", 300, 2000, 576)]
    for qtype, rows, n, k in cases:
        w = torch.randn(n, k, generator=gen) * 0.05
        b = _blocks(w, qtype)
        x = torch.randn(rows, k, generator=gen).bfloat16()
        dense = b.dequantize().bfloat16()
        y = QuantizedWeight.pack(b).linear(x, path=path)
        assert torch.equal(y, ops.linear_amx(x, ops.pack_linear_amx(dense), n, None))
        y = QuantizedWeight.pack(b, gate_up=True).linear(x, path=path)
        assert torch.equal(y, ops.linear_silu_mul_amx(x, ops.pack_gate_up_amx(dense), n // 2))


@needs_kernel
def test_linear_quant_refuses_mismatched_operands_and_bad_paths():
    ops = torch.ops.chunkattn_layers
    qw = QuantizedWeight.pack(quantize(torch.randn(64, 96), "q8_0"))
    x = torch.randn(3, 96).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.linear_quant(x.float(), qw.packed, qw.kind, 64, None, 0)
    with pytest.raises(RuntimeError, match=r"packed must be"):
        ops.linear_quant(torch.randn(3, 128).bfloat16(), qw.packed, qw.kind, 64, None, 0)
    with pytest.raises(RuntimeError, match=r"packed must be"):
        ops.linear_quant(x, qw.packed, 0, 64, None, 0)  # q8 tiles read as q4
    with pytest.raises(RuntimeError, match="path must be"):
        ops.linear_quant(x, qw.packed, qw.kind, 64, None, 7)
    with pytest.raises(RuntimeError, match=r"packed must be"):
        ops.linear_quant(x, qw.packed, 2, 64, None, 0)  # q8 tiles read as q6
    with pytest.raises(RuntimeError, match=r"packed must be"):
        ops.linear_quant(x, qw.packed, 3, 64, None, 0)  # q8 tiles read as q5
    with pytest.raises(RuntimeError, match=r"kind must be 0 \(q4"):
        ops.linear_quant(x, qw.packed, 8, 64, None, 0)
    iq4 = QuantizedWeight.pack(iq4_nl_blocks(torch.randn(64, x.shape[1])))
    with pytest.raises(RuntimeError, match="path 4 .* has no iq4 kernel"):
        ops.linear_quant(x, iq4.packed, iq4.kind, 64, None, 4)
    q5 = QuantizedWeight.pack(q5_1_blocks(torch.randn(64, x.shape[1])))
    half = torch.ones(2, 1, dtype=torch.float16)
    with pytest.raises(QuantizationError, match="q5_1 values must be 0..31, got 32"):  # (not spilled into a bit)
        Blocks.from_values("q5_1", torch.full((2, 32), 32, dtype=torch.uint8), half, half)
    with pytest.raises(RuntimeError, match="path 4 .* has no q5 kernel"):
        ops.linear_quant(x, q5.packed, q5.kind, 64, None, 4)
    q4x16 = QuantizedWeight.pack(q4x16_blocks(torch.randn(64, x.shape[1])))
    with pytest.raises(RuntimeError, match="path 4 .* has no q4x16 kernel"):
        ops.linear_quant(x, q4x16.packed, q4x16.kind, 64, None, 4)
    with pytest.raises(QuantizationError, match="q4x16 values must be 0..15, got 16"):
        Blocks.from_values("q4x16", torch.full((2, 32), 16, dtype=torch.uint8), half.repeat(1, 2), half.repeat(1, 2))
    q2x16 = QuantizedWeight.pack(q2x16_blocks(torch.randn(64, x.shape[1])))
    with pytest.raises(RuntimeError, match="path 4 .* has no q2x16 kernel"):
        ops.linear_quant(x, q2x16.packed, q2x16.kind, 64, None, 4)
    with pytest.raises(QuantizationError, match="q2x16 values must be 0..3, got 4"):
        Blocks.from_values("q2x16", torch.full((2, 32), 4, dtype=torch.uint8), half.repeat(1, 2), half.repeat(1, 2))
    q3x16 = QuantizedWeight.pack(q3x16_blocks(torch.randn(64, x.shape[1])))
    with pytest.raises(RuntimeError, match="path 4 .* has no q3x16 kernel"):
        ops.linear_quant(x, q3x16.packed, q3x16.kind, 64, None, 4)
    with pytest.raises(QuantizationError, match="q3x16 values must be 0..7, got 8"):  # (not spilled into a bit)
        Blocks.from_values("q3x16", torch.full((2, 32), 8, dtype=torch.uint8), half.repeat(1, 2), None)
    with pytest.raises(QuantizationError, match="q3x16 values must be 0..7, got -1"):  # (not wrapped to 255)
        Blocks.from_values("q3x16", torch.full((2, 32), -1, dtype=torch.int16), half.repeat(1, 2), None)
    assert ops.linear_quant(x[:0], qw.packed, qw.kind, 64, None, 0).shape == (0, 64)
    with pytest.raises(RuntimeError, match="positive multiple of 32"):  # K = 0: refused, not a division by zero
        ops.linear_quant(torch.empty(2, 0).bfloat16(), torch.empty(2, 0, 2, 544, dtype=torch.uint8), 1, 64, None, 0)
    emb = Embedding(64, 96)
    emb.set_quantized(QuantizedWeight.pack(quantize(torch.randn(64, 96), "q8_0")))
    assert emb(torch.empty(0, dtype=torch.long)).shape == (0, 96) and emb(torch.tensor([[1, 2]])).shape == (1, 2, 96)


def test_float32_input_falls_back_to_the_dequantized_weight(caplog):
    qw = QuantizedWeight.pack(quantize(torch.randn(40, 64), "q4_1"))
    x = torch.randn(5, 64)
    _warn_dense_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        y = qw.linear(x)
    torch.testing.assert_close(y, x @ qw.dequantize().T)
    assert "dequantizing them on every call" in caplog.text


def test_modules_take_a_quantized_weight_and_drop_the_dense_one():
    lin, gu = Linear(64, 40), GateUpLinear(64, 24)
    qw = QuantizedWeight.pack(quantize(torch.randn(40, 64), "q4_0"))
    lin.set_quantized(qw)
    assert lin.weight.numel() == 0 and lin.quant is qw and not lin.prepack()
    assert "quantized=q4_0" in repr(lin)
    with pytest.raises(ValueError, match="cannot take"):
        gu.set_quantized(qw)  # not a gate/up pack
    gu.set_quantized(QuantizedWeight.pack(quantize(torch.randn(48, 64), "q8_0"), gate_up=True))
    x = torch.randn(3, 64).bfloat16()
    assert gu.dense_weight().dtype == torch.bfloat16 and gu.dense_weight().shape == (48, 64)
    ref = torch.nn.functional.linear(x.float(), gu.quant.dequantize())  # 3 rows: exact weights (q8: integer x)
    ref = torch.nn.functional.silu(ref[:, :24]) * ref[:, 24:]
    torch.testing.assert_close(gu(x).float(), ref, atol=0.01 * float(ref.abs().max()), rtol=0.01)


def test_quantization_needs_bfloat16_on_the_cpu_and_a_known_type():
    with pytest.raises(QuantizationError, match="dtype bfloat16"):
        load_model(quantization="gguf", dtype=torch.float32)
    with pytest.raises(QuantizationError, match="unknown quantization"):
        load_model(quantization="int3")
    with pytest.raises(QuantizationError, match="random weights have none"):
        load_model(TINY_CONFIG, random_weights=True, dtype=torch.bfloat16, quantization="gguf")


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_at_load_keeps_embeddings_and_head_at_8_bits(qtype):
    """--quantization q4_0 / q4_1 / q8_0 on any checkpoint: every linear layer of that type, the (tied) embeddings
    and LM head q8_0 as llama.cpp's 4-bit files keep them, and the model runs."""
    loaded = load_model(TINY_CONFIG, random_weights=True, dtype=torch.bfloat16, quantization=qtype)
    model = loaded.model
    assert model.model.embed_tokens.quant.qtype == "q8_0" and model.lm_head.quant is model.model.embed_tokens.quant
    layers = [m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]
    assert layers and all(m.quant is not None and m.quant.qtype == qtype for m in layers)
    assert weight_bytes(model)["dense"] < 0.05 * weight_bytes(model)["total"]
    from chunkattn.engine.llm import LLM
    from chunkattn.engine.sampling import SamplingParams

    out = LLM(loaded=loaded, kv_cache_tokens=512).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].token_ids) == 4


@needs_kernel
def test_default_model_runs_as_stored_without_a_full_precision_copy():
    """The Q4_1 file with its blocks kept: ~92 MiB of weights (bf16: 257), each weight exactly the bf16 of
    GGUF's dequantization, the tied LM head sharing the Q8_0 embedding's pack, and prefill logits equal to the
    dequantized bf16 model's (the same panel products on the same values)."""
    q = load_model(dtype=torch.bfloat16)  # quantization "auto"
    d = load_model(dtype=torch.bfloat16, quantization="none")
    sizes = weight_bytes(q.model)
    assert sizes["quantized"] > 0 and sizes["total"] < 0.4 * weight_bytes(d.model)["total"]
    assert q.model.lm_head.quant is q.model.model.embed_tokens.quant is not None
    assert q.model.lm_head.quant.qtype == "q8_0"
    for name, module in q.model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            assert module.quant is not None and module.quant.qtype == "q4_1", name
            dense = d.model.get_submodule(name).dense_weight()
            assert torch.equal(module.dense_weight().view(torch.int16), dense.view(torch.int16)), name
    ids = torch.tensor(q.tokenizer.encode("The capital of France is Paris, the capital of Italy is Rome, and the "
                                          "capital of Spain is"))
    emb_q, emb_d = q.model.model.embed_tokens(ids), d.model.model.embed_tokens(ids)
    assert torch.equal(emb_q.view(torch.int16), emb_d.view(torch.int16))
    from chunkattn import PrefixKVCache
    from chunkattn.attention import get_backend

    outs = []
    for m in (q, d):
        cfg = m.config
        cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=16, max_tokens=256,
                              dtype=torch.bfloat16)
        seq = cache.add_sequence(ids.tolist())
        attn = get_backend("auto", cache)
        attn.plan(cache.extend([seq], [ids.tolist()]))
        # more rows than the direct paths take, so both multiply by the bf16 panels (linear_amx / path 1 on AMX
        # tiles; without AMX linear_amx's vdpbf16ps / path 2)
        outs.append(m.model(ids, torch.arange(len(ids)), attn))
    assert q.model.model.layers[0].mlp.down_proj.quant.auto_path(len(ids)) in (1, 2)  # (dequantizing: 21 rows)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantizing_each_weight_as_read_equals_quantizing_the_dense_model(qtype, tmp_path, caplog):
    """--quantization on a checkpoint quantizes each tensor as it is read (q/k/v and gate/up as parts, before they
    are fused; from two shards), never holding them all dense: the packs equal quantizing the fused dense weights,
    a layer whose K is not a multiple of 32 (down_proj, K = 80) stays dense and the log says so, and the norms
    are the checkpoint's cast to bf16."""
    from transformers import AutoConfig
    from transformers import LlamaForCausalLM as HFLlama

    from chunkattn.model import build_model, config_from_hf

    cfg = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 80,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "tie_word_embeddings": False}
    torch.manual_seed(zlib.crc32(qtype.encode()))
    sd = {k: torch.randn(v.shape) * 0.1 for k, v in HFLlama(AutoConfig.for_model(**cfg)).state_dict().items()}
    write_checkpoint(tmp_path, cfg, sd, shards=2)
    with caplog.at_level(logging.INFO, logger="chunkattn.load"):
        got = load_model(tmp_path, dtype=torch.bfloat16, quantization=qtype).model
    assert "not quantized (K not a multiple of 32): model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj" \
        in caplog.text
    want = build_model(config_from_hf(cfg), dict(sd), torch.bfloat16, "cpu", quantize=qtype)
    modules = dict(want.named_modules())
    for name, module in got.named_modules():
        if isinstance(module, (Linear, Embedding)):
            ref = modules[name]
            assert (module.quant is None) == (ref.quant is None) == name.endswith("down_proj"), name
            if module.quant is None:
                assert torch.equal(module.dense_weight(), ref.dense_weight()), name
            else:
                assert module.quant.qtype == ref.quant.qtype == (qtype if ".layers." in name else "q8_0"), name
                assert torch.equal(module.quant.packed, ref.quant.packed), name
    qkv = [sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]  # (independently of the loader)
    pack = QuantizedWeight.pack(quantize(torch.cat(qkv), qtype)).packed
    assert torch.equal(got.model.layers[1].self_attn.qkv_proj.quant.packed, pack)
    assert torch.equal(got.model.norm.weight, sd["model.norm.weight"].bfloat16())
