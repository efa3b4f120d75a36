"""A decode step's linear layers on the CPU: chunkattn's float32 panels vs oneDNN's packed product.

Every linear layer of the model (fused q/k/v, o, fused gate/up, down in every decoder layer, then the LM head),
in model order, as one engine step runs them: each weight is read once per step, so from DRAM (cold), not from
cache. Both layouts are made from the same weights and timed alternately, ``--repeats`` passes each; prints one
line per row count and writes JSON.

    python benchmarks/linear_cpu.py --rows 1 8 32 64 1088 --out benchmarks/results/linear-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from chunkattn import native
from chunkattn.bench.kernel import device_name
from chunkattn.model import load_model
from chunkattn.model.layers import Linear


def cpu_model() -> str:
    """The CPU's model name and family (Linux), e.g. "AMD EPYC, family 26"."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    return f"{fields.get('model name', 'unknown')}, family {fields.get('cpu family', '?')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 1088])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not native.linear_supported():
        raise SystemExit("chunkattn's float32 panels need the native kernels built with AVX-512 on this CPU")
    model = load_model(dtype=torch.float32).model
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, Linear)]  # model order, LM head last
    panels = [torch.ops.chunkattn_layers.pack_linear(w) for w in weights]
    flop_per_row = sum(2 * w.numel() for w in weights)
    points = []
    for rows in args.rows:
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}

        def run_onednn(onednn: list[torch.Tensor] = onednn, xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, onednn):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def run_panels(xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, panels):
                torch.ops.chunkattn_layers.linear(xs[w.shape[1]], p, w.shape[0], None)

        times: dict[str, list[float]] = {"onednn": [], "panels": []}
        for i in range(args.repeats + 1):  # alternated; the first pass of each is a warm-up
            for name, fn in (("onednn", run_onednn), ("panels", run_panels)):
                t = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        point = {"rows": rows, **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
                 **{f"{k}_min_ms": round(min(times[k]) * 1e3, 2) for k in times},
                 **{f"{k}_gflops": round(flop_per_row * rows / v / 1e9, 1) for k, v in med.items()},
                 "ratio": round(med["panels"] / med["onednn"], 3)}
        points.append(point)
        print(f"rows {rows:5d}: oneDNN {point['onednn_ms']:8.2f} ms ({point['onednn_gflops']} GFLOP/s), panels "
              f"{point['panels_ms']:8.2f} ms ({point['panels_gflops']} GFLOP/s), ratio {point['ratio']}")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"device": device_name(torch.device("cpu")), "cpu": cpu_model(),
                "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
                "products": len(weights), "weights_mb": round(sum(w.numel() for w in weights) * 4 / 2**20, 1)}
        args.out.write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
