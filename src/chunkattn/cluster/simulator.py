"""A discrete-event simulator of N engine replicas behind the router, on a cost model calibrated from
measurements: it runs the same :class:`~chunkattn.cluster.router.Router` as the real deployment.

Each replica does continuous batching in steps: a step admits waiting requests (up to ``max_batch``
running), computes their uncached prompt tokens (prefill) and one token of every running request (decode);
its duration comes from :class:`CostModel`. A replica's prefix cache is an LRU of token blocks capped at its
K/V capacity. Requests come from tenants, each with its own system prompt, chosen with Zipf popularity, with
unique questions and Poisson arrivals. See ``docs/cluster-simulation.md`` for the assumptions.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from chunkattn.cluster.router import PrefixIndex, Router, RoutingStats, make_policy
from chunkattn.extras import pyplot


@dataclass(frozen=True)
class CostModel:
    """Seconds per engine step: ``step_base + per_seq * running + per_prefill_token * new prompt tokens
    + per_context_token * (distinct context tokens the step reads)``; ``kv_capacity_tokens`` per replica."""

    step_base: float
    per_seq: float
    per_prefill_token: float
    per_context_token: float
    kv_capacity_tokens: int
    max_batch: int = 64
    source: str = ""

    @classmethod
    def cpu_smollm2_2core(cls, kv_capacity_tokens: int = 65536) -> CostModel:
        """SmolLM2-135M fp32 on the 2-core dev VM, fitted to measurements of 2026-11-28 (commit 8fc5f02): a
        1088-token cold prefill ~655 ms, a 64-token tail over a cached 1K prefix ~65 ms, a decode step of
        32 sequences sharing a 1K prompt ~49.5 ms (about 15.8 ms of it attention), of 1 sequence ~14 ms."""
        return cls(step_base=0.0125, per_seq=0.00095, per_prefill_token=0.00055, per_context_token=3.5e-6,
                   kv_capacity_tokens=kv_capacity_tokens,
                   source="cpu-smollm2-2core (chunkattn bench serve / peer runs, 2026-11-28)")

    def scaled(self, slowdown: float) -> CostModel:
        """The same machine ``slowdown`` times slower (e.g. replicas sharing its cores)."""
        return replace(self, step_base=self.step_base * slowdown, per_seq=self.per_seq * slowdown,
                       per_prefill_token=self.per_prefill_token * slowdown,
                       per_context_token=self.per_context_token * slowdown,
                       source=f"{self.source} x{slowdown:g} slower")

    def step_seconds(self, running: int, prefill_tokens: int, context_tokens: int) -> float:
        return (self.step_base + self.per_seq * running + self.per_prefill_token * prefill_tokens
                + self.per_context_token * context_tokens)


@dataclass
class Workload:
    """``tenants`` system prompts of ``shared_len`` tokens, Zipf(``zipf``) popularity (0: uniform), unique
    ``question_len``-token questions, ``output_len`` tokens each, Poisson arrivals at ``rate`` per second."""

    requests: int = 400
    tenants: int = 8
    shared_len: int = 1024
    question_len: int = 64
    output_len: int = 64
    rate: float = 2.0
    zipf: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.requests, self.tenants, self.output_len) < 1 or self.shared_len + self.question_len < 1:
            raise ValueError("requests, tenants, output_len and the prompt length must be >= 1")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")

    def generate(self) -> list[tuple[float, int, list[int]]]:
        """``(arrival time, tenant, prompt token ids)`` in arrival order."""
        rng = random.Random(self.seed)
        systems = [[rng.randrange(32000) for _ in range(self.shared_len)] for _ in range(self.tenants)]
        weights = [1.0 / (k + 1) ** self.zipf for k in range(self.tenants)]
        out, t = [], 0.0
        for _ in range(self.requests):
            t += rng.expovariate(self.rate)
            tenant = rng.choices(range(self.tenants), weights)[0]
            out.append((t, tenant, systems[tenant] + [rng.randrange(32000) for _ in range(self.question_len)]))
        return out


@dataclass(eq=False)
class _Req:
    arrival: float
    prompt: list[int]
    hashes: list[int]
    output_len: int
    replica: str = ""
    first_token: float | None = None
    finish: float | None = None
    generated: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class _Replica:
    name: str
    cost: CostModel
    block_size: int
    cache: PrefixIndex = field(init=False)
    waiting: deque[_Req] = field(default_factory=deque)
    running: list[_Req] = field(default_factory=list)
    busy: bool = False
    served: int = 0

    def __post_init__(self) -> None:
        self.cache = PrefixIndex(self.cost.kv_capacity_tokens // self.block_size)

    def step(self, now: float) -> tuple[float, list[_Req]]:
        """Run one step starting at ``now``: ``(its end, requests that finished in it)``."""
        admitted: list[_Req] = []
        while self.waiting and len(self.running) + len(admitted) < self.cost.max_batch:
            admitted.append(self.waiting.popleft())
        prefill = 0
        for r in admitted:  # matched before any of them is inserted: a prefix computed in this step is no hit
            r.cached_tokens = min(self.cache.match(r.hashes) * self.block_size, len(r.prompt) - 1)
            prefill += len(r.prompt) - r.cached_tokens
        for r in admitted:
            self.cache.insert(r.hashes)
        running = self.running + admitted
        context = len({h for r in running for h in r.hashes}) * self.block_size + \
            sum(len(r.prompt) % self.block_size + r.generated for r in running)
        end = now + self.cost.step_seconds(len(running), prefill, context)
        for r in self.running:
            r.generated += 1
        for r in admitted:
            r.first_token = end
            r.generated = 1
        finished = [r for r in running if r.generated >= r.output_len]
        for r in finished:
            r.finish = end
        self.running = running  # the finished leave at the step's end (see simulate), not before
        return end, finished


def simulate(policy: str, replicas: int, workload: Workload, cost: CostModel, block_size: int = 64,
             report_interval: float = 1.0) -> dict[str, Any]:
    """Run the workload through ``replicas`` replicas routed by ``policy``; returns hit rate, TTFT p50/p90
    (seconds), output tokens/s and requests per replica."""
    router = Router(make_policy(policy), block_size=block_size)
    reps = {f"r{i}": _Replica(f"r{i}", cost, block_size) for i in range(replicas)}
    for name in reps:
        router.add_replica(name, cost.kv_capacity_tokens)
    arrivals = workload.generate()
    events: list[tuple[float, int, str, Any]] = []  # (time, seq, kind, payload)
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    reqs = []
    for t, _, prompt in arrivals:
        r = _Req(t, prompt, router.blocks(prompt), workload.output_len)
        reqs.append(r)
        push(t, "arrive", r)
    if report_interval > 0:
        push(report_interval, "report", None)
    pending = len(reqs)
    while events and pending:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            name = router.choose(payload.hashes)
            router.record(name, payload.hashes)
            payload.replica = name
            rep = reps[name]
            rep.waiting.append(payload)
            rep.served += 1
            if not rep.busy:
                rep.busy = True
                push(now, "step", rep)
        elif kind == "step":
            rep = payload
            end, finished = rep.step(now)
            push(end, "step_end", (rep, finished))
        elif kind == "step_end":
            rep, finished = payload
            rep.running = [r for r in rep.running if r.finish is None]
            for _ in finished:
                router.finished(rep.name)
                pending -= 1
            if rep.running or rep.waiting:
                push(now, "step", rep)
            else:
                rep.busy = False
        elif kind == "report":
            for name, rep in reps.items():
                router.report(name, RoutingStats(queue_len=len(rep.waiting) + len(rep.running),
                                                 held_blocks=rep.cache.blocks()))
            push(now + report_interval, "report", None)
    ttft = [r.first_token - r.arrival for r in reqs if r.first_token is not None]
    makespan = max(r.finish for r in reqs if r.finish is not None) - min(r.arrival for r in reqs)
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    return {
        "policy": policy, "replicas": replicas, "workload": asdict(workload), "cost_model": cost.source,
        "hit_rate": sum(r.cached_tokens for r in reqs) / prompt_tokens,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
        "output_tokens_per_s": sum(r.generated for r in reqs) / makespan,
        "requests_per_replica": sorted((rep.served for rep in reps.values()), reverse=True),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(rows: list[dict[str, Any]]) -> str:
    lines = ["| req/s per replica | zipf | policy | replicas | hit rate | TTFT p50 s | TTFT p90 s | out tok/s | "
             "max/min requests per replica |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["requests_per_replica"]
        lines.append(f"| {r.get('rate_per_replica', '-')} | {r['workload']['zipf']:g} | {r['policy']} | "
                     f"{r['replicas']} | {r['hit_rate']:.1%} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p90_s']:.3f} | {r['output_tokens_per_s']:.1f} | {per[0]}/{per[-1]} |")
    return "\n".join(lines)


def sweep(replica_counts: list[int], zipfs: list[float], policies: list[str], cost: CostModel,
          rates_per_replica: list[float], tenants_per_replica: float = 2.0, requests_per_replica: int = 40,
          shared_len: int = 1024, question_len: int = 64, output_len: int = 32, seed: int = 0,
          block_size: int = 64) -> list[dict[str, Any]]:
    """Every (rate, replicas, zipf, policy); tenants, requests and the arrival rate scale with the replicas."""
    rows = []
    for rate in rates_per_replica:
        for n in replica_counts:
            for z in zipfs:
                w = Workload(requests=requests_per_replica * n, tenants=max(1, round(tenants_per_replica * n)),
                             shared_len=shared_len, question_len=question_len, output_len=output_len,
                             rate=rate * n, zipf=z, seed=seed)
                for p in policies:
                    row = simulate(p, n, w, cost, block_size)
                    row["rate_per_replica"] = rate
                    rows.append(row)
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()

    panels = [("hit_rate", "prefix hit rate"), ("ttft_p50_s", "TTFT p50 (s)"),
              ("output_tokens_per_s", "output tokens/s per replica")]
    rates = sorted({r["rate_per_replica"] for r in rows})
    fig, grid = plt.subplots(len(rates), 3, figsize=(15, 4.2 * len(rates)), squeeze=False)
    policies = sorted({r["policy"] for r in rows})
    zipfs = sorted({r["workload"]["zipf"] for r in rows})
    colors = dict(zip(policies, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for axes, rate in zip(grid, rates):
        for ax, (key, label) in zip(axes, panels):
            for p in policies:
                for z, style in zip(zipfs, ["-", "--", ":"]):
                    pts = sorted((r["replicas"], r[key] / (r["replicas"] if key == "output_tokens_per_s" else 1))
                                 for r in rows if r["policy"] == p and r["workload"]["zipf"] == z
                                 and r["rate_per_replica"] == rate)
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=colors[p],
                            label=f"{p}, zipf {z:g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("replicas")
            ax.set_title(f"{label}, {rate:g} req/s per replica")
        axes[0].legend(fontsize=7)
    fig.suptitle(f"simulated: {rows[0]['cost_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["CostModel", "Workload", "plot_sweep", "simulate", "summarize", "sweep"]
