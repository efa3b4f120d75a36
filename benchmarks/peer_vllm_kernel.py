"""The kernel peer of issue 7: vLLM's own CPU decode attention op on `chunkattn bench kernel`'s decode shapes.

Run with the vLLM virtualenv's Python (benchmarks/peer_vllm_cpu.sh kernel does, alternating with chunkattn):

    /work/peer/vllm-venv/bin/python benchmarks/peer_vllm_kernel.py --points 32/2048/64 32/4096/64/9/3/64 \
        --dtype float32 bfloat16 --json out.json

A point is B/n_s/n_c[/H/Hkv/d] (default H = Hkv = 32, d = 128): B sequences, each an n_s-token shared prompt
plus n_c tokens of its own, the last of them the token being decoded (one query per sequence), as in
src/chunkattn/bench/kernel.py.

The ops are called the way vLLM's CPU backend (vllm/v1/attention/backends/cpu_attn.py) calls them through
vllm._custom_ops: one KV cache tensor [blocks, Hkv, block_size, 2 * d] viewed as key and value halves,
``cpu_attn_reshape_and_cache`` to store K/V through a slot mapping, ``cpu_attn_get_scheduler_metadata`` once per
step, then ``cpu_attention_with_kv_cache``. Block size 128 (vLLM's CPU default). Prefix caching shares only
whole blocks, so the sequences' block tables point the first n_s // 128 blocks at the same physical blocks and
everything after (the prompt's partial last block, copied, and the sequence's own tokens) at blocks of their own.

Reported per point: the median time of the attention op alone (what `chunkattn bench kernel` times for its
providers: K/V already stored), and beside it the per-step metadata and the store of the step's new K/V; the
relative error against a float64 softmax attention over each sequence's K/V, computed here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_POINTS = ["32/1024/64", "32/2048/64", "32/4096/64", "32/2048/512", "64/2048/64", "32/16/1024",
                  "32/4096/64/9/3/64"]
BLOCK = 128


def parse_point(text: str) -> dict[str, int]:
    parts = [int(x) for x in text.split("/")]
    if len(parts) not in (3, 6):
        raise argparse.ArgumentTypeError(f"point {text!r}: expected B/n_s/n_c or B/n_s/n_c/H/Hkv/d")
    b, ns, nc = parts[:3]
    h, hkv, d = parts[3:] if len(parts) == 6 else (32, 32, 128)
    if nc < 1 or h % hkv:
        raise argparse.ArgumentTypeError(f"point {text!r}: n_c >= 1 and H a multiple of Hkv")
    return {"batch": b, "shared": ns, "private": nc, "heads": h, "kv_heads": hkv, "head_dim": d}


def time_median_us(fn: Callable[[], Any], min_time_s: float = 1.0, max_reps: int = 50, warmup: int = 2) -> float:
    """Median wall time after warm-up, for >= min_time_s or max_reps calls, whichever comes first (at least 3):
    the same rule as chunkattn's kernel benchmark."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def attn_isa(dtype: torch.dtype, head_dim: int) -> str:
    """The ISA string vLLM's CPU backend would pick for this dtype/head size (its own selection function)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(dtype, BLOCK, head_dim, "auto")
    except Exception as exc:  # noqa: BLE001 - fall back to the plain vector path, and say so
        print(f"note: could not ask vLLM for the attention ISA ({exc!r}); using 'vec'", file=sys.stderr)
        return "vec"


def run_point(p: dict[str, int], dtype_name: str, seed: int) -> dict[str, Any]:
    from vllm import _custom_ops as ops
    from vllm import envs

    dtype = DTYPES[dtype_name]
    b, ns, nc, h, hkv, d = (p[k] for k in ("batch", "shared", "private", "heads", "kv_heads", "head_dim"))
    seq_len = ns + nc
    isa = attn_isa(dtype, d)
    gen = torch.Generator().manual_seed(seed)

    # Random K/V of the shared prompt and of each sequence's own tokens (the decoded token last), in the dtype.
    shared_k = torch.randn(ns, hkv, d, generator=gen).to(dtype)
    shared_v = torch.randn(ns, hkv, d, generator=gen).to(dtype)
    own_k = torch.randn(b, nc, hkv, d, generator=gen).to(dtype)
    own_v = torch.randn(b, nc, hkv, d, generator=gen).to(dtype)
    q = torch.randn(b, h, d, generator=gen).to(dtype)

    # Block tables: whole blocks of the prompt are shared (what prefix caching can reuse); the rest is private.
    shared_blocks = ns // BLOCK
    private_blocks = math.ceil(seq_len / BLOCK) - shared_blocks
    num_blocks = shared_blocks + b * private_blocks
    table = torch.empty(b, shared_blocks + private_blocks, dtype=torch.int32)
    table[:, :shared_blocks] = torch.arange(shared_blocks, dtype=torch.int32)
    for i in range(b):
        first = shared_blocks + i * private_blocks
        table[i, shared_blocks:] = torch.arange(first, first + private_blocks, dtype=torch.int32)

    # vLLM's CPU KV cache: one tensor per layer, [blocks, Hkv, block_size, 2*d], split into K and V halves.
    kv_cache = torch.zeros(num_blocks, hkv, BLOCK, 2 * d, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, hkv, 2 * BLOCK, d).chunk(2, dim=2)

    def slots(seq: int, positions: torch.Tensor) -> torch.Tensor:
        return table[seq, positions // BLOCK].long() * BLOCK + positions % BLOCK

    def store(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache, slot_mapping, isa)

    # Fill: the shared whole blocks once, then each sequence's own blocks (its copy of the prompt's partial last
    # block, then its own tokens but the decoded one), as prefill would have left them.
    shared_whole = shared_blocks * BLOCK
    if shared_whole:
        store(shared_k[:shared_whole], shared_v[:shared_whole], slots(0, torch.arange(shared_whole)))
    for i in range(b):
        pos = torch.arange(shared_whole, seq_len - 1)
        k = torch.cat([shared_k[shared_whole:], own_k[i, :-1]])
        v = torch.cat([shared_v[shared_whole:], own_v[i, :-1]])
        if len(pos):
            store(k, v, slots(i, pos))

    # The decode step: one new token per sequence.
    last = torch.tensor([seq_len - 1])
    step_slots = torch.cat([slots(i, last) for i in range(b)])
    step_k, step_v = own_k[:, -1].contiguous(), own_v[:, -1].contiguous()
    query_start_loc = torch.arange(b + 1, dtype=torch.int32)
    seq_lens = torch.full((b,), seq_len, dtype=torch.int32)
    split_kv = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)

    def metadata() -> torch.Tensor:
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=b, num_heads=h, num_kv_heads=hkv, head_dim=d, seq_lens=seq_lens, dtype=dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=split_kv)

    store(step_k, step_v, step_slots)
    sched = metadata()
    out = torch.empty(b, h, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)

    def attend() -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0.0, scheduler_metadata=sched, s_aux=None)
        return out

    got = attend().double().clone()

    # float64 reference: per sequence, softmax(q k^T * scale) v over its own K/V (the dtype's values, widened).
    group = h // hkv
    ref = torch.empty(b, h, d, dtype=torch.float64)
    sk, sv = shared_k.double(), shared_v.double()
    for i in range(b):
        k = torch.cat([sk, own_k[i].double()]).transpose(0, 1)  # [Hkv, L, d]
        v = torch.cat([sv, own_v[i].double()]).transpose(0, 1)
        qi = q[i].double().view(hkv, group, d)
        w = torch.softmax(qi @ k.transpose(1, 2) * scale, dim=-1)  # [Hkv, g, L]
        ref[i] = (w @ v).reshape(h, d)
    rel_err = float((got - ref).norm() / ref.norm())

    median = time_median_us(attend)
    meta_us = time_median_us(metadata, min_time_s=0.2)
    store_us = time_median_us(lambda: store(step_k, step_v, step_slots), min_time_s=0.2)
    elem = torch.tensor([], dtype=dtype).element_size()
    unique_tokens = ns + b * nc
    return {**p, "dtype": dtype_name, "provider": "vllm-cpu", "median_us": round(median, 2), "rel_err": rel_err,
            "block_size": BLOCK, "isa": isa, "split_kv": split_kv, "shared_blocks": shared_blocks,
            "kv_bytes": num_blocks * hkv * BLOCK * 2 * d * elem,
            # GB/s over the distinct K/V bytes (as chunkattn's rows), and over what per-sequence reads touch.
            "gbps": round(2 * unique_tokens * hkv * d * elem / (median * 1e-6) / 1e9, 2),
            "effective_gbps": round(2 * b * seq_len * hkv * d * elem / (median * 1e-6) / 1e9, 2),
            "metadata_us": round(meta_us, 2), "store_us": round(store_us, 2), "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", type=parse_point, help=f"B/n_s/n_c[/H/Hkv/d] (default: {DEFAULT_POINTS})")
    # One point the way `chunkattn bench kernel` spells it (peer_vllm_cpu.sh uses these).
    ap.add_argument("--batch", type=int)
    ap.add_argument("--shared", type=int)
    ap.add_argument("--private", type=int)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (vLLM's op uses torch's OpenMP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    # vLLM's CPU attention op runs AMX tile instructions where the CPU has them; Linux grants a process the tile
    # state only on request, which vLLM's engine makes and a bare op call does not: without it, SIGILL.
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init_amx is not None:
        init_amx()

    if args.batch is not None:
        if args.shared is None or args.private is None:
            ap.error("--batch needs --shared and --private")
        points = [parse_point(f"{args.batch}/{args.shared}/{args.private}/{args.heads}/"
                              f"{args.kv_heads or args.heads}/{args.head_dim}")]
    else:
        points = args.points or [parse_point(x) for x in DEFAULT_POINTS]
    # vLLM's kernels are built against torch's OpenMP runtime (libgomp): torch.set_num_threads sets how many
    # threads their parallel regions get.
    torch.set_num_threads(args.threads)

    import vllm

    result: dict[str, Any] = {
        "provider": "vllm-cpu", "vllm": vllm.__version__, "torch": torch.__version__,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_", "KMP_", "GOMP_"))},
        "rows": [],
    }
    for dtype in args.dtype:
        for p in points:
            row = run_point(p, dtype, args.seed)
            result["rows"].append(row)
            print(f"vllm-cpu B={row['batch']:<4} n_s={row['shared']:<5} n_c={row['private']:<5} "
                  f"H={row['heads']}/{row['kv_heads']} d={row['head_dim']} {dtype:>8} isa={row['isa']}: "
                  f"{row['median_us']:11.1f} us  err {row['rel_err']:.1e}  {row['gbps']:7.1f} GB/s  "
                  f"(metadata {row['metadata_us']:.1f} us, store {row['store_us']:.1f} us)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
