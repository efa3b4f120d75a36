"""Property-based: the linear kernels against float64. The quantized kernel (``chunkattn_layers.linear_quant`` /
``linear_silu_mul_quant``, every held kind, every path this CPU runs) on raw random blocks; the dense layers
(float32 and bfloat16, as the engine runs them) on any shape.

test_quant.py's parametrized tests use weights quantized from Gaussians at a few shapes and row counts. Here
Hypothesis draws the blocks' integers over each kind's whole range (q8's -128 included, which llama.cpp never writes
but a file may hold), scales and offsets of random sign over ~30 binades (float16 subnormals included) with all-zero
blocks, x rows of very different magnitudes with zero blocks, about half of them sparse (a few terms: a tight
bound), a column slice of a wider x (a row stride other than K), odd N (a last panel part empty), K from 32 to 5120
(1-160 blocks), 1-700 rows (every path's row limits, the passes of rows the direct and integer paths make, the
vector path's blocks of rows by 1 MB of x), 1 or 2 threads, bias, and the gate/up epilogue. Each output is checked
against its float64 product within that path's rounding bound (helpers.check_quant_linear), path 0 bit for bit
against the path the kernel says it takes, and the native embedding lookup bit for bit against the Python
dequantization. Each run draws new examples (``CHUNKATTN_FUZZ_EXAMPLES`` for a longer search than CI's).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chunkattn import native
from chunkattn.model.quant import HELD, Blocks, QuantizedWeight, int_x_supported, kernel_supported
from helpers import check_quant_linear, silu_mul_error, torch_threads

needs_kernel = pytest.mark.skipif(not kernel_supported(), reason="the quantized kernel needs AVX512-BF16 (and the "
                                  "native build)")

# the paths this CPU runs: 1 AMX tiles, 2 vdpbf16ps on the dequantized panel, 3 direct from the integers, 4 x as
# 15-bit integers (AVX512-VNNI; q4, q8 and q6 only)
PATHS = ([1] if native.amx_linear_supported() else []) + [2, 3]
INT_X_TYPES = ("q4_0", "q4_1", "q8_0", "q6_k") if kernel_supported() and int_x_supported() else ()
# each kind's values (q8: int8), weights per scale, and whether it has offsets
TOP = {"q4_0": 15, "q4_1": 15, "q6_k": 63, "q5_1": 31, "iq4_nl": 15, "q4x16": 15, "q2x16": 3, "q3x16": 7}
PER16 = ("q6_k", "q4x16", "q2x16", "q3x16")
OFFSETS = ("q4_0", "q4_1", "q5_1", "q4x16", "q2x16")


def _scales(gen: torch.Generator, shape: tuple[int, int], binade: int, zero: float) -> torch.Tensor:
    """float16 scales of random sign whose magnitudes span 8 binades below 2^binade (the lowest binades: float16
    subnormals, some rounding to 0), a fraction ``zero`` of them exactly 0."""
    mag = torch.exp2(binade - 8 * torch.rand(shape, generator=gen)) * (1 + torch.rand(shape, generator=gen))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    keep = torch.rand(shape, generator=gen) >= zero
    return (mag * sign * keep).half()


@st.composite
def cases(draw: st.DrawFn) -> dict:
    qtype = draw(st.sampled_from(HELD))
    gate_up = draw(st.booleans())
    n = draw(st.integers(1, 100))
    return {
        "qtype": qtype, "gate_up": gate_up, "n": 2 * n if gate_up else n,
        "k": 32 * draw(st.one_of(st.integers(1, 48), st.integers(49, 160))),
        "rows": draw(st.one_of(st.integers(1, 40), st.integers(41, 140), st.integers(300, 700))),
        "binade": draw(st.integers(-20, 2)), "zero": draw(st.sampled_from([0.0, 0.1, 0.5])),
        "x_binades": draw(st.integers(0, 24)), "x_slice": draw(st.booleans()),
        "bias": draw(st.booleans()) and not gate_up, "threads": draw(st.sampled_from([1, 2])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _blocks(c: dict, gen: torch.Generator) -> Blocks:
    qtype, n, k = c["qtype"], c["n"], c["k"]
    if qtype == "q8_0":
        q = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    else:
        q = torch.randint(0, TOP[qtype] + 1, (n, k), generator=gen).to(torch.uint8)
    shape = (n, k // (16 if qtype in PER16 else 32))
    d = _scales(gen, shape, c["binade"], c["zero"])
    # offsets of about the weights' own size (a block's minimum is -d times up to half its range)
    m = _scales(gen, shape, c["binade"] + 3, c["zero"]) if qtype in OFFSETS else None
    return Blocks.from_values(qtype, q, d, m)


def _x_values(gen: torch.Generator, rows: int, width: int, binades: int, lo: int = 0, hi: int | None = None
              ) -> torch.Tensor:
    """float32 ``[rows, width]``: each row scaled by 2^(0 .. -binades), a tenth of the blocks of 32 zero, and about
    half the rows sparse (1-3 nonzero values, in columns ``lo`` to ``hi``: the part a test slices out). A sparse
    row's output sums a few terms, so its rounding bound is tight: one weight read from the wrong place or a wrong
    scale shows there, where a dense row's float32 bound (K eps times the sum of its terms) would hide it."""
    hi = width if hi is None else hi
    x = torch.randn(rows, width, generator=gen) * torch.exp2(-binades * torch.rand(rows, 1, generator=gen))
    zero = (torch.rand(rows, -(-width // 32), generator=gen) < 0.1).repeat_interleave(32, 1)[:, :width]
    few = torch.zeros(rows, width, dtype=torch.bool).scatter_(1, torch.randint(lo, hi, (rows, 3), generator=gen),
                                                              True)
    sparse = torch.rand(rows, 1, generator=gen) < 0.5
    return x * ~zero * torch.where(sparse, few, True)


def _x(c: dict, gen: torch.Generator) -> torch.Tensor:
    """bf16 x (:func:`_x_values`), as a column slice of a wider tensor where ``x_slice``."""
    rows, k = c["rows"], c["k"]
    if not c["x_slice"]:
        return _x_values(gen, rows, k, c["x_binades"]).bfloat16()
    return _x_values(gen, rows, k + 32, c["x_binades"], 16, 16 + k).bfloat16()[:, 16:16 + k]


@needs_kernel
@settings(max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_quantized_linear_against_float64(c):
    gen = torch.Generator().manual_seed(c["seed"])
    blocks = _blocks(c, gen)
    qw = QuantizedWeight.pack(blocks, gate_up=c["gate_up"])
    exact = qw.dequantize()  # (the packed panels read back: the same values as the blocks, or packing is wrong)
    assert torch.equal(exact, blocks.dequantize())
    x = _x(c, gen)
    b = (torch.randn(c["n"], generator=gen) * 0.1).bfloat16() if c["bias"] else None
    chosen = qw.auto_path(c["rows"])
    event(f"{c['qtype']}: path 0 is {chosen}")
    event(f"rows {'1-40' if c['rows'] <= 40 else '41-140' if c['rows'] <= 140 else '300-700'}, "
          f"K {'<= 1536' if c['k'] <= 1536 else '> 1536'}")
    with torch_threads(c["threads"]):
        auto = qw.linear(x, b)
        for path in PATHS + ([4] if c["qtype"] in INT_X_TYPES else []):
            y = qw.linear(x, b, path=path)
            check_quant_linear(y, x, blocks, exact, b, c["gate_up"], path)
            if path == chosen:
                assert torch.equal(auto, y), path
        if not c["gate_up"]:  # the embedding lookup: rows in any order, repeated
            ids = torch.randint(0, c["n"], (min(c["rows"], 50),), generator=gen)
            assert torch.equal(qw.lookup(ids), qw.rows(ids))


@st.composite
def dense_cases(draw: st.DrawFn) -> dict:
    gate_up = draw(st.booleans())
    return {
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])), "gate_up": gate_up,
        "fan_in": draw(st.one_of(st.integers(1, 100), st.integers(101, 2200))),
        "fan_out": draw(st.one_of(st.integers(1, 80), st.integers(81, 400))),
        "rows": draw(st.one_of(st.integers(0, 40), st.integers(41, 140), st.integers(300, 700))),
        "bias": draw(st.booleans()) and not gate_up, "x_binades": draw(st.integers(0, 24)),
        "x_slice": draw(st.booleans()), "threads": draw(st.sampled_from([1, 2, 3])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(c=dense_cases())
def test_dense_linear_layers_against_float64(c):
    """Linear and GateUpLinear as the engine runs them (prepacked: chunkattn's float32 panels, the bf16 panels on
    AMX tiles or by vdpbf16ps, oneDNN's or F.linear where those do not run here, whichever the layer picks for the
    row count) against float64, within a float32 sum's rounding bound of its terms (carried through silu(g) u),
    plus the output's rounding; any K and N (panels and 32-deep steps partly filled), x of mixed magnitudes and a
    longer row stride, 1-3 threads."""
    from chunkattn.model.layers import GateUpLinear, Linear

    gen = torch.Generator().manual_seed(c["seed"])
    dtype, rows, fan_in, fan_out, gate_up = c["dtype"], c["rows"], c["fan_in"], c["fan_out"], c["gate_up"]
    lin = GateUpLinear(fan_in, fan_out) if gate_up else Linear(fan_in, fan_out, bias=c["bias"])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * fan_in**-0.5)
        if c["bias"]:
            lin.bias.copy_(torch.randn(fan_out, generator=gen))
    lin = lin.to(dtype)
    packed = lin.prepack()
    event(f"{str(dtype)[6:]}: {lin.packed.kind if packed and lin.packed is not None else 'not packed'}")
    event(f"rows {'0-40' if rows <= 40 else '41-140' if rows <= 140 else '300-700'}, "
          f"K {'<= 100' if fan_in <= 100 else '> 100'}")
    if c["x_slice"]:
        x = _x_values(gen, rows, fan_in + 7, c["x_binades"], 3, 3 + fan_in).to(dtype)[:, 3:3 + fan_in]
    else:
        x = _x_values(gen, rows, fan_in, c["x_binades"]).to(dtype)
    with torch_threads(c["threads"]), torch.inference_mode():
        y = lin(x)
    w = lin.weight.detach().double()
    ref = x.double() @ w.T
    pre = fan_in * 2**-23 * (x.double().abs() @ w.abs().T)  # float32 sums of fan_in terms
    if gate_up:
        pre = silu_mul_error(pre, ref)
        ref = torch.nn.functional.silu(ref[:, :fan_out]) * ref[:, fan_out:]
    if c["bias"]:
        ref = ref + lin.bias.detach().double()
    out_eps = 2**-8 if dtype == torch.bfloat16 else 2**-20  # the output's rounding (float32: bias, silu)
    bound = pre + ref.abs() * out_eps + 1e-30
    assert y.dtype == dtype and y.shape == (rows, fan_out)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
