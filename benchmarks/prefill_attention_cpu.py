"""Causal prefill attention alone on the CPU kernels: one sequence of n new tokens, one layer, float32 or bfloat16.

    python benchmarks/prefill_attention_cpu.py --tokens 1088 4160 [--heads 9 --kv-heads 3 --head-dim 64]
        [--dtype bfloat16]

Prints the median time of `CpuBackend.run` over --repeats calls and the useful GFLOP/s (QK^T and PV over the
causal triangle). Run the builds to compare one after the other, several times: this VM drifts by 10-70%.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from chunkattn import PrefixKVCache
from chunkattn.attention import get_backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1088, 4160])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    dtype = getattr(torch, args.dtype)
    for n in args.tokens:
        cache = PrefixKVCache(1, hkv, d, chunk_size=64, max_tokens=n + 256, dtype=dtype)
        prompt = [rng.randrange(1000) for _ in range(n)]
        seq = cache.add_sequence(prompt)
        batch = cache.extend([seq], [prompt])
        cache.store(0, batch, torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype))
        backend = get_backend("cpu", cache)
        backend.plan(batch)
        q = torch.randn(n, h, d, dtype=dtype)
        backend.run(q, 0)  # warm-up: workspace, scratch
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            backend.run(q, 0)
            times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        flops = h * n * (n + 1) / 2 * d * 4
        print(f"{args.dtype} tokens={n} heads={h}/{hkv} d={d}: median {med * 1e3:.2f} ms, min {times[0] * 1e3:.2f} ms, "
              f"{flops / med / 1e9:.0f} useful GFLOP/s")


if __name__ == "__main__":
    main()
