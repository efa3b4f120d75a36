"""A step's linear layers on the CPU: chunkattn's packed panels against oneDNN's packed product and F.linear.

Every linear layer of the model (fused q/k/v, o, fused gate/up, down in every decoder layer, then the LM head),
in model order, as one engine step runs them: each weight is read once per step, so from DRAM (cold), not from
cache. Every layout is made from the same weights and timed alternately, ``--repeats`` passes each; prints one
line per row count and writes JSON.

* ``--dtype float32``: chunkattn's float32 panels (AVX-512) vs oneDNN's packed product;
* ``--dtype bfloat16``: what ``Linear`` runs (the bf16 panels: on AMX tiles up to ``Linear.panel_max_rows()`` rows,
  F.linear above; by AVX512-BF16 dot products at every row count on CPUs without AMX; oneDNN's packed product on
  CPUs with neither) vs oneDNN's packed product vs torch's own
  ``F.linear`` on the dense weights; ``--quantization q8_0 q4_0 ...`` adds the same weights block-quantized
  (``chunkattn.model.quant``: what ``--quantization`` loads), each as a row "<type>".

    python benchmarks/linear_cpu.py --rows 1 8 32 64 1088 --out benchmarks/results/linear-cpu-<date>.json
    python benchmarks/linear_cpu.py --dtype bfloat16 --rows 1 8 32 64 1088 4096 [--model cfg.json --random-weights]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chunkattn import native
from chunkattn.bench.kernel import device_name, git_commit
from chunkattn.model import load_model
from chunkattn.model.layers import GateUpLinear, Linear
from chunkattn.model.loader import random_model
from chunkattn.model.quant import QuantizedWeight, quantize


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
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model", help="model path, or a config.json with --random-weights (default: SmolLM2)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--layers", type=int, help="with --random-weights: only this many decoder layers of the shape "
                    "(each layer's products are the same; an 8B shape's 32 layers do not fit 24 GB twice over)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quantization", nargs="*", default=[], choices=["q8_0", "q4_0", "q4_1"],
                    help="with --dtype bfloat16: also time the weights quantized to these types")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float32 and not native.linear_supported():
        raise SystemExit("chunkattn's float32 panels need the native kernels built with AVX-512 on this CPU")
    if args.random_weights:
        config = Path(args.model)
        if args.layers:
            cfg = json.loads(config.read_text())
            cfg["num_hidden_layers"] = args.layers
            config = Path(tempfile.mkdtemp()) / "config.json"
            config.write_text(json.dumps(cfg))
        model = random_model(config, dtype, "cpu").model
    else:
        model = load_model(args.model, dtype=dtype, quantization="none").model
    layers = [m for m in model.modules() if isinstance(m, Linear)]  # model order, LM head last
    weights = [m.dense_weight().detach() for m in layers]
    flop_per_row = sum(2 * w.numel() for w in weights)
    if args.quantization and dtype != torch.bfloat16:
        raise SystemExit("--quantization runs with --dtype bfloat16")
    quantized = {qt: [QuantizedWeight.pack(quantize(w.float(), qt), gate_up=isinstance(m, GateUpLinear))
                      for m, w in zip(layers, weights)] for qt in args.quantization}
    points = []
    for rows in args.rows:
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        xs = {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for w in weights}}

        def run_onednn(onednn: list[torch.Tensor] = onednn, xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, onednn):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def run_chunkattn(xs: dict[int, torch.Tensor] = xs) -> None:  # Linear's own path, the pack prepack made
            for m in layers:
                Linear._product(m, xs[m.in_features], m.packed)

        def run_torch(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

        fns = {"onednn": run_onednn, "panels": run_chunkattn}
        if dtype == torch.bfloat16:
            fns["torch"] = run_torch
        for qt, packs in quantized.items():
            def run_quant(packs: list[QuantizedWeight] = packs, xs: dict[int, torch.Tensor] = xs) -> None:
                for q in packs:
                    q.linear(xs[q.in_features])

            fns[qt] = run_quant
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for i in range(args.repeats + 1):  # alternated; the first pass of each is a warm-up
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    if i:
                        times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        point = {"rows": rows, **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
                 **{f"{k}_min_ms": round(min(times[k]) * 1e3, 2) for k in times},
                 **{f"{k}_gflops": round(flop_per_row * rows / v / 1e9, 1) for k, v in med.items()},
                 "ratio": round(med["panels"] / med["onednn"], 3)}
        if "torch" in med:
            point["rate_vs_torch"] = round(med["torch"] / med["panels"], 3)  # >= 0.9: the target
        points.append(point)
        print(f"rows {rows:5d}: " + ", ".join(f"{k} {point[k + '_ms']:8.2f} ms ({point[k + '_gflops']} GFLOP/s)"
                                               for k in fns)
              + f", time vs oneDNN {point['ratio']}"
              + (f", rate vs F.linear {point['rate_vs_torch']}" if "rate_vs_torch" in point else ""))
    if args.out:
        from chunkattn.system import info

        meta = {"device": device_name(torch.device("cpu")), "cpu": cpu_model(), "dtype": args.dtype,
                "model": args.model or "SmolLM2-135M-Instruct", "layers": args.layers,
                "panels": sorted({m.packed.kind for m in layers if m.packed is not None}),
                "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                "system": info(), "products": len(weights),
                "weights_mb": round(sum(w.numel() * w.element_size() for w in weights) / 2**20, 1),
                **{f"{qt}_mb": round(sum(q.nbytes for q in packs) / 2**20, 1) for qt, packs in quantized.items()}}
        args.out.write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
