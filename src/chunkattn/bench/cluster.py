"""``chunkattn bench cluster``: N engine replicas on Ray Serve, one routing policy after another, on the same
shared-prefix workload through the HTTP ingress; and the simulator's prediction for the same setup.

Each (run, router) starts a fresh Serve application (cold caches), drives :func:`chunkattn.bench.serve.run_url`
with the simulator's workload (tenants' system prompts, unique questions, Poisson arrivals), reads the
requests each replica answered from the ingress's ``/metrics``, and deletes the application. Routers are
alternated within each run. Needs the ``cluster`` extra.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chunkattn.bench.serve import ServeConfig, run_url
from chunkattn.bench.serve import Workload as HttpWorkload
from chunkattn.cluster.simulator import CostModel, Workload, simulate
from chunkattn.extras import pyplot, require


@dataclass
class ClusterBenchConfig:
    """``replicas`` engines with ``kv_cache_tokens`` each and ``threads`` torch threads; ``cores``: the CPU
    cores they share (for the simulator's cost model, calibrated on 2 threads of this machine)."""

    replicas: int = 4
    routers: tuple[str, ...] = ("prefix-aware", "round-robin", "power-of-two", "ray-prefix")
    runs: int = 2
    kv_cache_tokens: int = 3072
    chunk_size: int = 64
    threads: int = 1
    cores: int = 2
    port: int = 8765
    stats_period_s: float = 1.0


def _replica_requests(url: str) -> list[int]:
    require("bench", "the benchmark's HTTP client")
    import httpx

    text = httpx.get(url + "/metrics", timeout=60).text
    counts = [int(float(v)) for v in re.findall(r'^chunkattn:replica_requests_total\{[^}]*\} (\S+)$', text, re.M)]
    return sorted(counts, reverse=True)


def run_cluster_bench(model: str | None, work: Workload, cfg: ClusterBenchConfig, dtype: str = "float32",
                      random_weights: bool = False, tokenizer: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """The rows (one per run and router) and the simulator's prediction per router."""
    import ray
    from ray import serve

    from chunkattn.cluster.serve import ClusterConfig, EngineSpec, start_cluster
    from chunkattn.server import ServerConfig

    arrivals = work.generate()
    http_work = HttpWorkload([p for _, _, p in arrivals], [t - arrivals[0][0] for t, _, _ in arrivals])
    spec = EngineSpec(model=model, tokenizer=tokenizer, random_weights=random_weights, dtype=dtype,
                      kv_cache_tokens=cfg.kv_cache_tokens, chunk_size=cfg.chunk_size, threads=cfg.threads)
    serve_cfg = ServeConfig(requests=work.requests, system_prompts=work.tenants, shared_len=work.shared_len,
                            question_len=work.question_len, output_len=work.output_len, rate=work.rate,
                            seed=work.seed, engine=spec)
    url = f"http://127.0.0.1:{cfg.port}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # (Ray's logging setup would print every request)
    rows: list[dict[str, Any]] = []
    ray.init(num_cpus=max(4, cfg.replicas + 2), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        for run in range(cfg.runs):
            for router in cfg.routers:
                if progress:
                    print(f"run {run + 1}/{cfg.runs}: {router} ...", flush=True)
                start_cluster(spec, ClusterConfig(replicas=cfg.replicas, router=router,
                                                  stats_period_s=cfg.stats_period_s),
                              ServerConfig("bench"), port=cfg.port)
                try:
                    row = run_url(url, serve_cfg, http_work, "bench", idle=False)
                    row.update(router=router, run=run, requests_per_replica=_replica_requests(url))
                finally:
                    serve.delete("chunkattn")
                rows.append(row)
                if progress:
                    print(f"  hit {row['prefix_hit_rate']:.1%}, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                          f"{row['output_tokens_per_s']:.1f} tok/s, per replica {row['requests_per_replica']}",
                          flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    # The simulator on the same workload: its cost model was fitted on one engine with 2 threads of this
    # machine; here each replica gets cores / replicas of it when all are busy.
    slowdown = 2.0 / (cfg.cores / cfg.replicas)
    cost = CostModel.cpu_smollm2_2core(cfg.kv_cache_tokens).scaled(slowdown)
    sims = {r: simulate(r, cfg.replicas, work, cost, cfg.chunk_size, cfg.stats_period_s)
            for r in cfg.routers if r != "ray-prefix"}
    return {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "machine": f"{os.cpu_count()} CPUs",
            "torch": torch.__version__, "ray": ray.__version__,
            "model": model or "SmolLM2-135M-Instruct", "dtype": dtype, "config": asdict(cfg),
            "workload": asdict(work), "rows": rows, "simulated": sims, "sim_slowdown": slowdown,
            "summary": summarize(rows, sims)}


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def summarize(rows: list[dict[str, Any]], sims: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per router: means over runs (and the simulator's prediction, with its relative error)."""
    out: dict[str, Any] = {}
    for router in dict.fromkeys(r["router"] for r in rows):
        mine = [r for r in rows if r["router"] == router]
        s: dict[str, Any] = {"runs": len(mine), "hit_rate": _mean(mine, "prefix_hit_rate"),
                             "ttft_p50_ms": _mean(mine, "ttft_p50_ms"), "ttft_p90_ms": _mean(mine, "ttft_p90_ms"),
                             "output_tokens_per_s": _mean(mine, "output_tokens_per_s"),
                             "requests_per_replica": [r["requests_per_replica"] for r in mine]}
        sim = sims.get(router)
        if sim is not None:
            s["sim"] = {"hit_rate": sim["hit_rate"], "ttft_p50_ms": sim["ttft_p50_s"] * 1e3,
                        "ttft_p90_ms": sim["ttft_p90_s"] * 1e3, "output_tokens_per_s": sim["output_tokens_per_s"]}
            s["sim_error"] = {k: (s["sim"][k] - s[k]) / s[k] if s[k] else None for k in s["sim"]}
        out[router] = s
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = ["| router | hit rate | TTFT p50 ms | TTFT p90 ms | out tok/s | requests per replica | simulated hit / "
             "TTFT p50 / tok/s |", "|---|---|---|---|---|---|---|"]
    for router, s in result["summary"].items():
        sim = s.get("sim")
        simtxt = (f"{sim['hit_rate']:.1%} / {sim['ttft_p50_ms']:.0f} / {sim['output_tokens_per_s']:.1f}"
                  if sim else "-")
        per = "; ".join("/".join(map(str, p)) for p in s["requests_per_replica"])
        lines.append(f"| {router} | {s['hit_rate']:.1%} | {s['ttft_p50_ms']:.0f} | {s['ttft_p90_ms']:.0f} | "
                     f"{s['output_tokens_per_s']:.1f} | {per} | {simtxt} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()

    summary = result["summary"]
    routers = list(summary)
    panels = [("hit_rate", "prefix hit rate"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p90_ms", "TTFT p90 (ms)"),
              ("output_tokens_per_s", "output tokens/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    x = range(len(routers))
    for ax, (key, title) in zip(axes, panels):
        measured = [summary[r][key] for r in routers]
        ax.bar([i - 0.2 for i in x], measured, 0.4, label="measured (mean of runs)", color="tab:blue")
        for i, r in enumerate(routers):
            ax.scatter([i - 0.2] * summary[r]["runs"], [row[key if key != "hit_rate" else "prefix_hit_rate"]
                                                        for row in result["rows"] if row["router"] == r],
                       color="black", s=10, zorder=3)
        sims = [summary[r].get("sim", {}).get(key, float("nan")) for r in routers]
        ax.bar([i + 0.2 for i in x], sims, 0.4, label="simulated", color="tab:orange")
        ax.set_xticks(list(x), routers, rotation=20)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    w = result["workload"]
    fig.suptitle(f"{result['config']['replicas']} replicas of {result['model']} on {result['machine']}, "
                 f"{w['tenants']} system prompts x {w['shared_len']} tokens, {w['requests']} requests at "
                 f"{w['rate']}/s, K/V {result['config']['kv_cache_tokens']} tokens per replica ({result['date']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["ClusterBenchConfig", "format_table", "plot", "run_cluster_bench", "summarize"]
