"""Where the quantized kernel should switch paths on this CPU: for each held weight type and each number of rows of
x, the time of every path the kernel has for it, and the row limits those times imply next to the ones
``csrc/linear_quant.cpp``'s ``auto_path`` takes (``direct_max_rows``, ``int16_max_rows``).

The products are a model shape's decoder layer (fused q/k/v, o, fused gate/up, down), ``--layers`` copies of it so
that a pass reads the weights from memory as a decode step does (four 1B layers: ~120 MB of 4-bit weights), random
values in every type (the kernel's time does not depend on them). The paths (``QuantizedWeight.linear``'s ``path``):
``panels`` (each panel dequantized to bf16, then AMX tiles where the CPU has AMX, else ``vdpbf16ps``: path 1 / 2),
``direct`` (the stored integers as they are: path 3) and ``int`` (x as 15-bit integers by ``vpdpbusd``: path 4, the
types that have it, where the CPU has AVX512-VNNI). Each pass of every path at a row count is timed alternately,
``--repeats`` times after a warm-up; ratios of medians. A limit "measured" is the largest row count up to which the
path was faster than ``panels`` at every row count measured (so a row count beyond it may still be faster: widen
``--rows`` to see).

    python benchmarks/quant_paths.py [--model benchmarks/configs/llama-3.2-1b.json] [--rows 1 2 3 4 6 8 12 16 24]
                                     [--types q4_1 q8_0 ...] [--out benchmarks/results/quant-paths-<date>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from chunkattn.bench.kernel import git_commit
from chunkattn.model.quant import BLOCK, HELD, Blocks, QuantizedWeight, int_x_supported, kernel_supported

CONFIG = Path(__file__).parent / "configs" / "llama-3.2-1b.json"
INT_X = ("q8_0", "q4_0", "q4_1", "q6_k")  # the types with path 4 (csrc: panel_q{8,4,6}_int16)
_TOP = {"q8_0": None, "q6_k": 63, "q5_1": 31, "q2x16": 3, "q3x16": 7}  # values' range (else 0..15; q8_0: int8)
_PER16 = ("q6_k", "q4x16", "q2x16", "q3x16")  # a scale per 16 weights
_NO_OFFSET = ("q8_0", "q6_k", "iq4_nl", "q3x16")


def random_blocks(qtype: str, n: int, k: int, gen: torch.Generator) -> Blocks:
    """``[n, k]`` blocks of ``qtype`` with random values, scales ~0.01 and offsets ~-0.08."""
    top = _TOP.get(qtype, 15)
    if top is None:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = torch.randint(0, top + 1, (n, k), generator=gen, dtype=torch.uint8)
    per = 16 if qtype in _PER16 else BLOCK
    d = (torch.rand(n, k // per, generator=gen) * 0.01 + 0.005).half()
    m = None if qtype in _NO_OFFSET else (-8 * d.float()).half()
    return Blocks("q6_k", q, d, None) if qtype == "q6_k" else Blocks.from_values(qtype, q, d, m)


def layer_shapes(config: Path) -> list[tuple[int, int, bool]]:
    """One decoder layer's products as (N, K, gate_up): fused q/k/v, o, fused gate/up, down."""
    c = json.loads(config.read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    kv = c.get("num_key_value_heads", c["num_attention_heads"])
    return [((c["num_attention_heads"] + 2 * kv) * d, h, False), (h, c["num_attention_heads"] * d, False),
            (2 * inter, h, True), (h, inter, False)]


def limit(ratios: dict[int, float]) -> int:
    """The largest row count up to which every measured ratio (path / panels) is below 1 (0: not even 1 row)."""
    best = 0
    for rows in sorted(ratios):
        if ratios[rows] >= 1:
            break
        best = rows
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=CONFIG, help="a config.json of the shape (default: Llama-3.2-1B)")
    ap.add_argument("--layers", type=int, default=4, help="copies of the decoder layer's products (out of cache)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24])
    ap.add_argument("--types", nargs="+", default=[t for t in HELD if t != "q4_0"], choices=HELD,
                    help="held types (q4_0 is held as q4_1: the same kind)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not kernel_supported():
        raise SystemExit("the quantized kernel does not run here (it needs AVX512-BF16 and the native build)")
    gen = torch.Generator().manual_seed(0)
    shapes = layer_shapes(args.model) * args.layers
    weights = {t: [QuantizedWeight.pack(random_blocks(t, n, k, gen), gate_up=g) for n, k, g in shapes]
               for t in args.types}
    panel_path = weights[args.types[0]][0].auto_path(10**6)  # 1 AMX tiles or 2 vector: what many rows take
    points, table = [], {}
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in {k for _, k, _ in shapes}}
        for qtype, packs in weights.items():
            paths = {"panels": panel_path, "direct": 3}
            if qtype in INT_X and int_x_supported():
                paths["int"] = 4
            times: dict[str, list[float]] = {p: [] for p in paths}
            with torch.inference_mode():
                for i in range(args.repeats + 1):  # alternated; the first pass of each is a warm-up
                    for name, path in paths.items():
                        t0 = time.perf_counter()
                        for w in packs:
                            w.linear(xs[w.in_features], path=path)
                        if i:
                            times[name].append(time.perf_counter() - t0)
            med = {p: statistics.median(v) for p, v in times.items()}
            auto = {1: "panels", 2: "panels", 3: "direct", 4: "int"}[packs[0].auto_path(rows)]
            point = {"type": qtype, "rows": rows, "auto": auto,
                     **{f"{p}_ms": round(v * 1e3, 3) for p, v in med.items()},
                     **{f"{p}_vs_panels": round(v / med["panels"], 3) for p, v in med.items() if p != "panels"}}
            points.append(point)
            table.setdefault(qtype, {})[rows] = point
            fastest = min(med, key=med.__getitem__)
            print(f"rows {rows:3d} {qtype:7s} " + "  ".join(f"{p} {v * 1e3:7.2f} ms" for p, v in med.items())
                  + "  " + "  ".join(f"{p}/panels {point[p + '_vs_panels']:.2f}" for p in med if p != "panels")
                  + f"  auto: {auto}" + ("" if fastest == auto else f"  (fastest: {fastest})"), flush=True)
    limits = {}
    for qtype, by_rows in table.items():
        measured = {p: limit({r: pt[f"{p}_vs_panels"] for r, pt in by_rows.items()})
                    for p in ("direct", "int") if f"{p}_vs_panels" in next(iter(by_rows.values()))}
        taken = {p: max([r for r, pt in by_rows.items() if pt["auto"] == p], default=0) for p in measured}
        limits[qtype] = {"measured": measured, "auto": taken}
        print(f"{qtype:7s} rows up to which each path beats the panels: measured "
              + ", ".join(f"{p} {n}" for p, n in measured.items()) + "; auto_path takes "
              + ", ".join(f"{p} up to {n}" if n else f"{p} never" for p, n in taken.items()))
    if args.out:
        from chunkattn.system import info

        meta = {"model": str(args.model), "layers": args.layers, "shapes": shapes[:4], "repeats": args.repeats,
                "panel_path": "tiles" if panel_path == 1 else "vector", "commit": git_commit(),
                "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "system": info()}
        args.out.write_text(json.dumps({"meta": meta, "limits": limits, "points": points}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
