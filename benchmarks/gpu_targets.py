"""Issue 24's targets against a GPU kernel sweep (``benchmarks/gpu_check.sh``'s ``kernel.json``, and its
``kernel-flashinfer.json`` when FlashInfer ran): per point, each provider's best of eager and CUDA-graph time, the
roofline (unique K/V bytes over the copy bandwidth measured in the same run) and the target
``min(1.5 x roofline + 5 us, best peer / 1.2)``, or within 1.05x of the best peer where almost nothing is shared
(n_s < one chunk). Prints a Markdown table; exits 1 where tpp-triton misses a target it was measured against.

    python benchmarks/gpu_targets.py out/kernel.json [out/kernel-flashinfer.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEERS = ("sdpa-flash", "flashinfer-paged", "flashinfer-cascade")
OURS = ("paged-triton", "tpp-triton")


def best_us(row: dict) -> float:
    """The faster of a row's eager and CUDA-graph medians."""
    graph = row.get("graph_median_us")
    return min(row["median_us"], graph) if graph else row["median_us"]


def targets(results: list[dict]) -> tuple[list[str], int]:
    """The table's lines and the number of points where tpp-triton misses its target."""
    points: dict[tuple[int, int, int], dict[str, dict]] = {}
    for result in results:
        for row in result["rows"]:
            key = (row["batch"], row["shared"], row["private"])
            points.setdefault(key, {})[row["provider"]] = row  # (a later file's row of a provider wins)
    head = ["B", "n_s", "n_c", "roofline", *PEERS, *OURS, "target", "tpp-triton / target", "vs cascade"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    misses = 0
    for (b, ns, nc), rows in sorted(points.items(), key=lambda kv: (kv[0][1] < 64, kv[0])):
        any_row = next(iter(rows.values()))
        roof = any_row["roofline_us"]
        peers = [best_us(rows[p]) for p in PEERS if p in rows]
        little_shared = ns < any_row["chunk_size"]
        if not peers:
            target = None
        elif little_shared:
            target = 1.05 * min(peers)
        else:
            target = min(1.5 * roof + 5, min(peers) / 1.2)
        ours = best_us(rows["tpp-triton"]) if "tpp-triton" in rows else None
        cells = [str(b), str(ns), str(nc), f"{roof:.1f}"]
        cells += [f"{best_us(rows[p]):.1f}" if p in rows else "-" for p in (*PEERS, *OURS)]
        cells.append(f"{target:.1f}" if target else "-")
        if ours is not None and target:
            cells.append(f"{ours / target:.2f}x" + (" (miss)" if ours > target else ""))
            misses += ours > target
        else:
            cells.append("-")
        cascade = rows.get("flashinfer-cascade")
        if cascade and ours:
            ratio = best_us(cascade) / ours
            cells.append(f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines, misses


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    results = [json.loads(Path(p).read_text()) for p in argv]
    first = results[0]
    print(f"{first.get('device')}, {first.get('date')}, commit {first.get('commit')}, torch {first.get('torch')}, "
          f"copy {first.get('copy_gbps')} GB/s; times in us, best of eager and CUDA graph\n")
    lines, misses = targets(results)
    print("\n".join(lines))
    ran = {row["provider"] for result in results for row in result["rows"]}
    notes = {p: why for result in results
             for p, why in {**result.get("skipped", {}), **result.get("errors", {})}.items() if p not in ran}
    for provider, why in notes.items():
        print(f"\n{provider}: {why}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
