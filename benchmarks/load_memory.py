"""Peak and final resident memory of one model load, in a fresh process (run it once per measurement).

    python benchmarks/load_memory.py benchmarks/configs/llama-3.1-8b.json --random-weights --dtype bfloat16 \
        --quantization q8_0
    python benchmarks/load_memory.py path/to/hf-dir --dtype bfloat16 --quantization q8_0

Prints the RSS before the load (imports), the high-water RSS (``VmHWM``), the RSS after it (anonymous and
file-mapped) and the bytes the model holds (``weight_bytes``). Run without ``LD_PRELOAD``d allocators to measure
glibc's malloc, which chunkattn's loads are tuned for.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chunkattn.model import loader


def status() -> dict[str, float]:
    """GiB of /proc/self/status's VmRSS, VmHWM, RssAnon and RssFile."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in f
                if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--quantization", default="none", choices=loader.QUANTIZATIONS)
    args = p.parse_args()
    before = status()
    start = time.perf_counter()
    loaded = loader.load_model(args.model, dtype=getattr(torch, args.dtype), random_weights=args.random_weights,
                               quantization=args.quantization)
    seconds = time.perf_counter() - start
    after = status()
    print(json.dumps({"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
                      "rss_before_gib": round(before["VmRSS"], 2), "peak_gib": round(after["VmHWM"], 2),
                      "rss_after_gib": round(after["VmRSS"], 2), "anon_after_gib": round(after["RssAnon"], 2),
                      "file_after_gib": round(after["RssFile"], 2),
                      "weights_gib": round(loader.weight_bytes(loaded.model)["total"] / 2**30, 2),
                      "load_s": round(seconds, 1)}))


if __name__ == "__main__":
    main()
