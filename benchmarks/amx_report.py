"""The README's tables for the AMX Xeon results of 2026-12-05, generated from the results JSON (not hand-edited).

    python benchmarks/amx_report.py [--date 2026-12-05] [--tag xeon-amx]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def serve_table(data: dict, label: str) -> list[str]:
    """vLLM vs chunkattn per row and dtype (peer_vllm_report's rows): medians over runs, ratios ours / vLLM."""
    out = [f"| {label} | dtype | runs | output tok/s vLLM / ours | TTFT p50 ms | TPOT p50 ms | idle TTFT cold ms |",
           "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        v, c = r["vllm"]["runs"], r["chunkattn"]["runs"]

        def med(rs: list[dict], key: str) -> float:
            return statistics.median(x[key] for x in rs)

        cells = []
        for key, fmt in (("output_tokens_per_s", ".0f"), ("ttft_p50_ms", ".0f"), ("tpot_p50_ms", ".1f"),
                         ("ttft_cold_ms", ".0f")):
            a, b = med(v, key), med(c, key)
            cells.append(f"{a:{fmt}} / {b:{fmt}} ({b / a:.2f}x)")
        out.append(f"| {r['row']} | {r['dtype']} | {len(c)} | " + " | ".join(cells) + " |")
    return out


def kernel_table(data: dict) -> list[str]:
    points: dict[tuple, dict[str, dict]] = {}
    for r in data["rows"]:
        key = (r["dtype"], r["batch"], r["shared"], r["private"], r["heads"], r["kv_heads"], r["head_dim"])
        points.setdefault(key, {})[r["provider"]] = r
    out = ["| dtype | B / n_s / n_c / H / Hkv / d | vLLM op µs | tpp-cpu µs | ratio |", "|---|---|---|---|---|"]
    for key in sorted(points, key=lambda k: (k[0], k[4], k[2], k[3], k[1])):
        p = points[key]
        if "vllm-cpu" in p and "tpp-cpu" in p:
            v, t = p["vllm-cpu"]["median_us"], p["tpp-cpu"]["median_us"]
            out.append(f"| {key[0]} | {'/'.join(map(str, key[1:]))} | {v:.0f} | {t:.0f} | {t / v:.2f}x |")
    return out


def linear_table(files: list[tuple[str, dict]]) -> list[str]:
    out = ["| shape | rows | ours ms | oneDNN packed ms | F.linear ms | our rate / F.linear's |",
           "|---|---|---|---|---|---|"]
    for name, data in files:
        for p in data["points"]:
            out.append(f"| {name} | {p['rows']} | {p['panels_ms']:.1f} | {p['onednn_ms']:.1f} | {p['torch_ms']:.1f} | "
                       f"{p['rate_vs_torch']:.2f}x |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--date", default="2026-12-05")
    ap.add_argument("--tag", default="xeon-amx")
    a = ap.parse_args()
    pre = f"{a.date}-{a.tag}"
    for name, label in ((f"peer-vllm-cpu-{pre}-final.json", "SmolLM2 row"),
                        (f"peer-vllm-cpu-{pre}-bf16.json", "SmolLM2 row"),
                        (f"peer-vllm-cpu-{pre}-1b.json", "Llama-3.2-1B shape, row")):
        data = load(name)
        if data:
            print(f"\n`{name}`\n")
            print("\n".join(serve_table(data, label)))
    kernel = load(f"peer-vllm-cpu-{pre}-kernel.json")
    if kernel:
        print(f"\n`peer-vllm-cpu-{pre}-kernel.json` (commit {kernel['chunkattn']['commit']})\n")
        print("\n".join(kernel_table(kernel)))
    lin = [(n, d) for n in ("smollm2", "1b", "8b-2layers")
           if (d := load(f"linear-cpu-{a.date}-{a.tag}-bf16-{n}.json")) is not None]
    if lin:
        print("\n`linear-cpu-...-bf16-*.json`\n")
        print("\n".join(linear_table(lin)))
    lc = load(f"peer-llamacpp-{pre}.json")
    if lc:
        r = lc["rows"]
        print(f"\n`peer-llamacpp-{pre}.json` (commit {lc['commit']})\n")
        print("| measure | llama.cpp (Q4_1 file) | chunkattn bf16 | chunkattn fp32 |\n|---|---|---|---|")
        print(f"| single stream, prompt 512 tok/s | {r['llama-bench pp512']['tokens_per_s']} | "
              f"{r['chunkattn bfloat16 pp512']['tokens_per_s']} | {r['chunkattn float32 pp512']['tokens_per_s']} |")
        print(f"| single stream, generate 128 tok/s | {r['llama-bench tg128']['tokens_per_s']} | "
              f"{r['chunkattn bfloat16 tg128']['tokens_per_s']} | {r['chunkattn float32 tg128']['tokens_per_s']} |")
        s, c = r["llama-server-serve"], r["chunkattn-serve"]
        print(f"| shared prompt, 32 requests: output tok/s (TTFT p50 ms) | {s['output_tokens_per_s']} "
              f"({s['ttft_p50_ms']:.0f}) | {c['output_tokens_per_s']} ({c['ttft_p50_ms']:.0f}) | |")
    ct = load(f"contention-{pre}.json")
    if ct:
        print(f"\n`contention-{pre}.json`: output tok/s alone / beside {ct['busy_processes']} nice-19 busy loops: "
              + "; ".join(f"{k} {v['output_tok_s']['alone']:.0f} / {v['output_tok_s']['busy']:.0f} "
                          f"({v['busy_over_alone']:.3f})" for k, v in ct["systems"].items()))


if __name__ == "__main__":
    main()
