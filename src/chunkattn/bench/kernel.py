"""Kernel micro-benchmark: one decode step of B sequences that share an ``n_s``-token prompt and hold
``n_c`` tokens of their own, as in the paper (Ye et al. 2024, section 4.1).

Every provider computes the same attention on the same K/V; each row reports the median time, the relative
error against the float64 reference and the K/V bytes that provider needs to hold. chunkattn's providers time
one layer's call of a backend planned for the step (what an engine pays per layer; the plan is built once per
step for every layer, as vLLM's op takes metadata built once per step, which its side times separately), not
the checked one-off ``chunkattn.attention`` (which also validates the batch and plans: ~20 µs more at 32
sequences).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import chunkattn
from chunkattn.attention import get_backend
from chunkattn.bench.workload import DTYPES, Config, Provider, ProviderUnavailable, Workload, build_workload
from chunkattn.extras import pyplot

CPU_PROVIDERS = ("naive", "sdpa", "reference", "cascade-torch", "tpp-torch", "tpp-cpu")
GPU_PROVIDERS = ("tpp-triton", "paged-triton", "sdpa-flash", "flashinfer-paged", "flashinfer-cascade")
ALL_PROVIDERS = CPU_PROVIDERS + GPU_PROVIDERS


# ---------------------------------------------------------------------------- providers


def _naive(w: Workload) -> tuple[Callable[[], torch.Tensor], int]:
    k, v = w.dense()
    c = w.config
    group = c.heads // c.kv_heads
    scale = 1.0 / math.sqrt(c.head_dim)
    q = w.q.view(c.batch, c.kv_heads, group, c.head_dim)  # [B, Hkv, g, d]

    def run() -> torch.Tensor:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, g, L]
        return torch.matmul(torch.softmax(s.float(), dim=-1).to(v.dtype), v).view(c.batch, c.heads, -1)

    return run, w.dense_kv_bytes()


def _sdpa(w: Workload, flash: bool = False) -> tuple[Callable[[], torch.Tensor], int]:
    k, v = w.dense()
    c = w.config
    q = w.q.unsqueeze(2)  # [B, H, 1, d]
    gqa = c.heads != c.kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run() -> torch.Tensor:
        return sdpa(q, k, v, enable_gqa=gqa).squeeze(2)

    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run_flash() -> torch.Tensor:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return run()

        return run_flash, w.dense_kv_bytes()
    return run, w.dense_kv_bytes()


def _cascade(w: Workload) -> tuple[Callable[[], torch.Tensor], int]:
    """A plain two-level cascade in PyTorch: one batched product of every query with the shared prefix (read
    once, contiguous), one per sequence with its own suffix, merged by their log-sum-exps (FlashInfer's
    cascade idea, without chunks or a tree). Holds the prefix once plus each suffix densely."""
    c = w.config
    group = c.heads // c.kv_heads
    scale = 1.0 / math.sqrt(c.head_dim)
    k, v = w.dense()  # [B, Hkv, L, d]
    ks, vs = k[0, :, : c.shared].contiguous(), v[0, :, : c.shared].contiguous()  # [Hkv, n_s, d], one copy
    kp, vp = k[:, :, c.shared :].contiguous(), v[:, :, c.shared :].contiguous()  # [B, Hkv, n_c, d]
    q = w.q.float().view(c.batch, c.kv_heads, group, c.head_dim) * scale  # [B, Hkv, g, d]

    def partial(qs: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.matmul(qs, keys.float().transpose(-1, -2))
        lse = torch.logsumexp(s, dim=-1)
        return torch.matmul(torch.softmax(s, dim=-1), vals.float()), lse

    def run() -> torch.Tensor:
        qs = q.permute(1, 0, 2, 3).reshape(c.kv_heads, c.batch * group, c.head_dim)  # [Hkv, B*g, d]
        o1, l1 = partial(qs, ks, vs) if c.shared else (None, None)
        o2, l2 = partial(q, kp, vp)  # [B, Hkv, g, d]
        if o1 is None or l1 is None:
            return o2.to(w.q.dtype).reshape(c.batch, c.heads, c.head_dim)
        o1 = o1.view(c.kv_heads, c.batch, group, -1).permute(1, 0, 2, 3)
        l1 = l1.view(c.kv_heads, c.batch, group).permute(1, 0, 2)
        lse = torch.logaddexp(l1, l2)
        out = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
        return out.to(w.q.dtype).reshape(c.batch, c.heads, c.head_dim)

    kv_bytes = 2 * (c.shared + c.batch * c.private) * c.kv_heads * c.head_dim * DTYPES[c.dtype].itemsize
    return run, kv_bytes


def _chunkattn(backend: str) -> Provider:
    def make(w: Workload) -> tuple[Callable[[], torch.Tensor], int]:
        impl = get_backend(backend, w.cache)
        with torch.inference_mode():
            impl.plan(w.batch)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return impl.run(w.q, 0)[0]

        return run, w.cache.stats()["kv_bytes"]

    return make


def provider_table() -> dict[str, Provider]:
    table: dict[str, Provider] = {
        "naive": _naive,
        "sdpa": _sdpa,
        "reference": _chunkattn("reference"),
        "tpp-torch": _chunkattn("torch"),
        "tpp-cpu": _chunkattn("cpu"),
        "cascade-torch": _cascade,
    }
    from chunkattn.bench import gpu_providers

    table.update(gpu_providers.providers(_sdpa))
    return table


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median_us(fn: Callable[[], Any], device: torch.device, min_time_s: float = 1.0, max_reps: int = 50,
                   warmup: int = 2) -> float:
    """Median wall time of ``fn`` in µs after ``warmup`` calls; CUDA: device events around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start_all < min_time_s):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 28) -> float:
    """A large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = time_median_us(lambda: dst.copy_(src), device, max_reps=20)
    return 2 * nbytes / (us * 1e-6) / 1e9


def git_commit() -> str:
    """The checkout's commit, or ``$CHUNKATTN_COMMIT`` when the source is not a git checkout (an exported
    tree, as the peer benchmark uses)."""
    if os.environ.get("CHUNKATTN_COMMIT"):
        return os.environ["CHUNKATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------- sweep
def run_sweep(configs: Iterable[Config], providers: list[str], *, cuda_graph: bool = False,
              progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Run every provider on every config. Returns the JSON-ready result (``device``, ``torch``, ``rows``)."""
    from tqdm import tqdm

    configs = list(configs)
    table = provider_table()
    unknown = [p for p in providers if p not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(table)}")
    device = torch.device(configs[0].device) if configs else torch.device("cpu")
    copy_gbps = copy_bandwidth_gbps(device)
    result: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "copy_gbps": round(copy_gbps, 1),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
        "skipped": {},
        "errors": {},  # provider -> failures (a bug to fix, unlike "skipped")
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    bar = tqdm(total=len(configs) * len(providers), disable=not progress, desc="bench kernel", unit="run")
    for config in configs:
        w = build_workload(config, seed)
        ref = chunkattn.attention(w.q, w.cache, w.batch, 0, backend="reference").double()
        roofline_us = w.unique_kv_bytes() / (copy_gbps * 1e9) * 1e6
        for name in providers:
            bar.set_postfix_str(f"{name} B={config.batch} n_s={config.shared} n_c={config.private}")
            try:
                fn, kv_bytes = table[name](w)
                out = fn().double()
            except ProviderUnavailable as exc:
                result["skipped"][name] = str(exc)
                bar.update(1)
                continue
            except Exception as exc:  # noqa: BLE001 - one broken provider must not cost the others' numbers
                result["errors"].setdefault(name, []).append(f"{config}: {exc!r}")
                bar.write(f"ERROR {name}: {exc!r}")
                bar.update(1)
                continue
            err = float((out - ref).norm() / ref.norm())
            median = time_median_us(fn, device, max_reps=10 if name == "reference" else 50)
            row = asdict(config) | {
                "provider": name,
                "median_us": round(median, 2),
                "rel_err": err,
                "kv_bytes": kv_bytes,
                "gbps": round(w.unique_kv_bytes() / (median * 1e-6) / 1e9, 2),
                "roofline_us": round(roofline_us, 2),
            }
            if cuda_graph and device.type == "cuda":
                row["graph_median_us"] = _graph_median_us(fn, device)
            result["rows"].append(row)
            bar.update(1)
            bar.write(format_row(row))
        del w
    bar.close()
    return result


def _graph_median_us(fn: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    """Capture ``fn`` in a CUDA graph and time its replays; None when it cannot be captured."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - not capturable (e.g. a peer's host-side work): eager timing only
        return None
    return round(time_median_us(graph.replay, device), 2)


def format_row(row: dict[str, Any]) -> str:
    graph = row.get("graph_median_us")
    graph_s = f" graph {graph:9.1f} us" if graph else ""
    return (f"{row['provider']:>18} B={row['batch']:<4} n_s={row['shared']:<5} n_c={row['private']:<5} "
            f"H={row['heads']}/{row['kv_heads']} d={row['head_dim']} c={row['chunk_size']} {row['dtype']:>8}: "
            f"{row['median_us']:11.1f} us{graph_s}  err {row['rel_err']:.1e}  "
            f"kv {row['kv_bytes'] / 2**20:9.1f} MiB  {row['gbps']:8.1f} GB/s  roofline {row['roofline_us']:.1f} us")


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the rows (speed-up and memory saving against ``sdpa`` where it ran)."""
    lines = [f"device: {result['device']}, torch {result['torch']}, commit {result['commit']}, "
             f"copy {result['copy_gbps']} GB/s",
             "",
             "| provider | B | n_s | n_c | median µs | vs sdpa | rel. err | KV MiB | KV vs sdpa |",
             "|---|---|---|---|---|---|---|---|---|"]
    key = ("batch", "shared", "private", "heads", "kv_heads", "head_dim", "chunk_size", "dtype")
    sdpa = {tuple(r[k] for k in key): r for r in result["rows"] if r["provider"] == "sdpa"}
    for r in result["rows"]:
        base = sdpa.get(tuple(r[k] for k in key))
        speed = f"{base['median_us'] / r['median_us']:.2f}x" if base else "-"
        mem = f"{100 * (1 - r['kv_bytes'] / base['kv_bytes']):.1f}% less" if base else "-"
        lines.append(f"| {r['provider']} | {r['batch']} | {r['shared']} | {r['private']} | {r['median_us']:.1f} | "
                     f"{speed} | {r['rel_err']:.1e} | {r['kv_bytes'] / 2**20:.1f} | {mem} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: median time per provider for each configuration (log scale)."""
    plt = pyplot()

    rows = result["rows"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    labels = list(dict.fromkeys(f"B={r['batch']}\nn_s={r['shared']}\nn_c={r['private']}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * max(1, len(providers) / 3)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs, ys = [], []
        for r in rows:
            if r["provider"] == p:
                xs.append(labels.index(f"B={r['batch']}\nn_s={r['shared']}\nn_c={r['private']}") + i * width)
                ys.append(r.get("graph_median_us") or r["median_us"])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("median time per decode step (µs)")
    ax.set_title(f"chunkattn kernel benchmark on {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configs_from_lists(**lists: list[Any]) -> list[Config]:
    """The cartesian product of every list option."""
    names = list(lists)
    return [Config(**dict(zip(names, values))) for values in itertools.product(*(lists[n] for n in names))]


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
