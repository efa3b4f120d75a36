"""End-to-end serving benchmark: Poisson arrivals of requests that share a few long system prompts.

Each request is one of ``system_prompts`` system prompts (``shared_len`` tokens) followed by a unique
question (``question_len`` tokens), and generates exactly ``output_len`` tokens. Systems: chunkattn with
prefix sharing, the same engine with sharing off (every request its own K/V, prompt recomputed), and Hugging
Face ``generate`` with one static batch.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from chunkattn.engine.args import SERVING_KV_CACHE_TOKENS, EngineArgs
from chunkattn.engine.llm import LLM
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.extras import pyplot, require
from chunkattn.model.loader import LoadedModel, to_transformers

SYSTEMS = ("chunkattn", "no-sharing", "hf")


def _serving_engine() -> EngineArgs:
    return EngineArgs(kv_cache_tokens=SERVING_KV_CACHE_TOKENS)


@dataclass
class ServeConfig:
    """The workload, and ``engine``: the engine options of the chunkattn systems (``kv_cache_tokens``
    defaults to :data:`~chunkattn.engine.args.SERVING_KV_CACHE_TOKENS`, as in ``chunkattn bench serve``;
    ``prefix_sharing`` is set per system; ``max_num_seqs`` is raised to ``requests``)."""

    requests: int = 32
    rate: float = float("inf")  # requests per second (Poisson); inf = all at t=0
    system_prompts: int = 1
    shared_len: int = 1024
    question_len: int = 64
    output_len: int = 64
    seed: int = 0
    engine: EngineArgs = field(default_factory=_serving_engine)

    #: The engine options results record in their ``config`` (see :meth:`as_dict`).
    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("kv_cache_tokens", "chunk_size", "max_num_batched_tokens",
                                                 "scheduling_policy", "max_overtakes")

    def __post_init__(self) -> None:
        if min(self.requests, self.system_prompts, self.question_len, self.output_len) < 1 or self.shared_len < 0:
            raise ValueError("requests, system prompts, question and output lengths must be >= 1")
        if self.rate <= 0:
            raise ValueError("--rate must be > 0 (inf: all requests at once)")
        if not isinstance(self.engine, EngineArgs):
            raise TypeError(f"engine must be an EngineArgs, got {type(self.engine).__name__}")

    def as_dict(self) -> dict[str, Any]:
        """The ``config`` of a result: the workload and :data:`ENGINE_FIELDS`, flat (as results always had it)."""
        return {"requests": self.requests, "rate": self.rate, "system_prompts": self.system_prompts,
                "shared_len": self.shared_len, "question_len": self.question_len, "output_len": self.output_len,
                **{name: getattr(self.engine, name) for name in self.ENGINE_FIELDS}, "seed": self.seed}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ServeConfig:
        """A result's ``config`` (:meth:`as_dict`) read back; other engine options take the defaults."""
        config = dict(config)
        engine = {name: config.pop(name) for name in cls.ENGINE_FIELDS if name in config}
        return cls(**config, engine=dataclasses.replace(_serving_engine(), **engine))


@dataclass
class Workload:
    prompts: list[list[int]]
    arrivals: list[float]  # seconds after the start


def make_workload(cfg: ServeConfig, vocab_size: int, special: set[int]) -> Workload:
    rng = random.Random(cfg.seed)
    vocab = [t for t in range(min(vocab_size, 32000)) if t not in special]
    systems = [[rng.choice(vocab) for _ in range(cfg.shared_len)] for _ in range(cfg.system_prompts)]
    prompts = [rng.choice(systems) + [rng.choice(vocab) for _ in range(cfg.question_len)]
               for _ in range(cfg.requests)]
    t, arrivals = 0.0, []
    for _ in prompts:
        arrivals.append(t)
        if cfg.rate != float("inf"):
            t += rng.expovariate(cfg.rate)
    return Workload(prompts, arrivals)


def idle_prompts(cfg: ServeConfig, vocab_size: int, rounds: int = 3) -> list[tuple[list[int], list[int]]]:
    """``(cold, hit)`` prompt pairs for timing TTFT on an idle engine: a new system prompt with a question, then
    the same system prompt with another question. Ids from the upper half of the first 30000 (unlike the
    workload's), so nothing is cached before; the same for every system timed (chunkattn, HTTP, vLLM)."""
    rng = random.Random(cfg.seed + 1)
    hi = min(vocab_size, 30000)
    pairs = []
    for _ in range(rounds):
        fresh = [rng.randrange(hi // 2, hi) for _ in range(cfg.shared_len)]
        cold, hit = ([*fresh, *(rng.randrange(hi // 2, hi) for _ in range(cfg.question_len))] for _ in range(2))
        pairs.append((cold, hit))
    return pairs


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _row(system: str, sharing: bool, outputs: list[RequestOutput], seconds: float, stats: dict[str, Any],
         peak_kv: int) -> dict[str, Any]:
    ttft = [o.metrics.ttft * 1e3 for o in outputs if o.metrics.ttft is not None]
    tpot = [o.metrics.tpot * 1e3 for o in outputs if o.metrics.tpot is not None]
    produced = sum(o.metrics.num_output_tokens for o in outputs)
    return {
        "system": system,
        "sharing": sharing,
        "requests": len(outputs),
        "output_tokens_per_s": round(produced / seconds, 2),
        "decode_tokens_per_s": round(stats.get("decode_tokens_per_s", 0.0), 2),
        "ttft_p50_ms": round(_pct(ttft, 50), 1),
        "ttft_p99_ms": round(_pct(ttft, 99), 1),
        "ttft_mean_ms": round(sum(ttft) / len(ttft), 1) if ttft else float("nan"),
        "tpot_p50_ms": round(_pct(tpot, 50), 1),
        "tpot_p99_ms": round(_pct(tpot, 99), 1),
        "peak_kv_bytes": int(peak_kv),
        "prefix_hit_rate": round(stats.get("prefix_hit_rate", 0.0), 4),
        "seconds": round(seconds, 2),
    }


def run_engine(loaded: LoadedModel, cfg: ServeConfig, work: Workload, sharing: bool,
               progress: Any = None) -> dict[str, Any]:
    """Submit the workload at its arrival times through the engine's loop (the same driver as every other
    front end); then time a cold and a cache-hit request alone on the idle engine."""
    args = dataclasses.replace(cfg.engine, prefix_sharing=sharing,
                               max_num_seqs=max(cfg.engine.max_num_seqs, cfg.requests))
    llm = LLM.from_args(args, loaded=loaded)
    engine = llm.engine
    params = SamplingParams(max_tokens=cfg.output_len, temperature=0, ignore_eos=True)
    finals: dict[str, RequestOutput] = {}

    def sink(out: RequestOutput) -> None:
        if out.finished:
            finals[out.request_id] = out
            if progress is not None:
                progress.update(1)

    # requests arriving at the same time are submitted together (with rate=inf: all at once)
    groups: list[tuple[float, list[list[int]]]] = []
    for arrival, prompt in zip(work.arrivals, work.prompts):
        if groups and groups[-1][0] == arrival:
            groups[-1][1].append(prompt)
        else:
            groups.append((arrival, [prompt]))
    llm.generate(work.prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up (kernels, allocator), untimed
    ids: list[str] = []
    start = time.perf_counter()

    def submit_all() -> None:  # the arrival process; this thread drives the engine meanwhile
        for arrival, prompts in groups:
            time.sleep(max(0.0, start + arrival - time.perf_counter()))
            ids.extend(llm.loop.submit_many([(p, params, None) for p in prompts], sink, arrival_time=start + arrival,
                                            start=False))

    arrivals = threading.Thread(target=submit_all, name="arrivals")
    arrivals.start()
    llm.loop.drive(lambda: not arrivals.is_alive() and len(finals) == len(ids))
    arrivals.join()
    seconds = time.perf_counter() - start
    outputs = [finals[i] for i in ids]
    row = _row("chunkattn" if sharing else "no-sharing", sharing, outputs, seconds, engine.stats.as_dict(),
               engine.stats.peak_live_kv_bytes)
    row["output_token_ids"] = [o.token_ids for o in outputs[:4]]  # greedy: compared with peers
    row["phase_s"] = {k: round(v, 3) for k, v in engine.stats.phase_time.items()}
    # TTFT on an idle engine, median of 3 rounds: a new system prompt (cold), then the same one with
    # another question (a cache hit, when sharing is on).
    cold: list[float] = []
    hit: list[float] = []
    for pair in idle_prompts(cfg, loaded.config.vocab_size):
        for times, prompt in zip((cold, hit), pair):
            ttft = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0].metrics.ttft
            assert ttft is not None
            times.append(ttft * 1e3)
    row["ttft_cold_ms"], row["ttft_hit_ms"] = round(_pct(cold, 50), 1), round(_pct(hit, 50), 1)
    return row


def run_hf(loaded: LoadedModel, cfg: ServeConfig, work: Workload) -> dict[str, Any]:
    """Hugging Face ``generate`` on all requests as one static batch (arrivals ignored: best case for it)."""
    mc = loaded.config
    weight = loaded.model.lm_head.weight
    hf = to_transformers(loaded)
    ids = torch.tensor(work.prompts, device=weight.device)  # equal lengths: no padding needed
    times: list[float] = []

    class _Clock:  # a streamer that only notes when each generated token arrives
        def put(self, value: torch.Tensor) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.output_len,
                    min_new_tokens=cfg.output_len, do_sample=False, streamer=_Clock())
    seconds = time.perf_counter() - start
    first = times[1] - start  # put #0 is the prompt
    per_token = (times[-1] - times[1]) / max(1, cfg.output_len - 1)
    per_token_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * weight.element_size()
    produced = cfg.requests * cfg.output_len
    return {
        "system": "hf", "sharing": False, "requests": cfg.requests,
        "output_tokens_per_s": round(produced / seconds, 2),
        "decode_tokens_per_s": round(cfg.requests * (cfg.output_len - 1) / (times[-1] - times[1]), 2),
        "ttft_p50_ms": round(first * 1e3, 1), "ttft_p99_ms": round(first * 1e3, 1),
        "tpot_p50_ms": round(per_token * 1e3, 1), "tpot_p99_ms": round(per_token * 1e3, 1),
        "peak_kv_bytes": cfg.requests * (ids.shape[1] + cfg.output_len) * per_token_bytes,
        "prefix_hit_rate": 0.0, "seconds": round(seconds, 2),
    }


def run_url(url: str, cfg: ServeConfig, work: Workload, model: str | None = None, api_key: str | None = None,
            progress: Any = None, vocab_size: int = 32000, idle: bool = True) -> dict[str, Any]:
    """The same workload through any OpenAI-compatible server at ``url`` (streamed ``/v1/completions`` with
    token-id prompts, ``ignore_eos``, greedy), timed by the client: TTFT at the first streamed token, TPOT
    over the rest; then (``idle``) a cold and a cache-hit request alone on the idle server."""
    import asyncio

    require("bench", "the benchmark's HTTP client")
    import httpx

    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int,
                  arrival: float) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                "stream": True, "stream_options": {"include_usage": True}}
        if model is not None:
            body["model"] = model
        times: list[float] = []
        usage: dict[str, Any] = {}
        async with client.stream("POST", base + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{base} answered {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{base} streamed an error: {chunk['error']}")
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if progress is not None:
            progress.update(1)
        n = int(usage.get("completion_tokens", len(times)))
        details = usage.get("prompt_tokens_details") or {}
        return {"ttft": times[0] - arrival if times else None,
                "tpot": (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None, "tokens": n,
                "prompt_tokens": int(usage.get("prompt_tokens", len(prompt))),
                "cached_tokens": int(details.get("cached_tokens") or 0)}

    async def main() -> tuple[list[dict[str, Any]], float, list[float], list[float]]:
        limits = httpx.Limits(max_connections=cfg.requests + 4, max_keepalive_connections=cfg.requests + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
            await one(client, work.prompts[0][:8], 2, time.perf_counter())  # warm-up, untimed
            start = time.perf_counter()

            async def at(arrival: float, prompt: list[int]) -> dict[str, Any]:
                await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
                return await one(client, prompt, cfg.output_len, start + arrival)

            results = await asyncio.gather(*(at(a, p) for a, p in zip(work.arrivals, work.prompts)))
            seconds = time.perf_counter() - start
            cold: list[float] = []
            hit: list[float] = []
            for pair in idle_prompts(cfg, vocab_size) if idle else []:
                for times, prompt in zip((cold, hit), pair):
                    r = await one(client, prompt, 1, time.perf_counter())
                    times.append(r["ttft"] * 1e3)
            return list(results), seconds, cold, hit

    results, seconds, cold, hit = asyncio.run(main())
    ttft = [r["ttft"] * 1e3 for r in results if r["ttft"] is not None]
    tpot = [r["tpot"] * 1e3 for r in results if r["tpot"] is not None]
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    return {
        "system": f"http:{base}", "sharing": None, "requests": len(results),
        "output_tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 2),
        "decode_tokens_per_s": None,
        "ttft_p50_ms": round(_pct(ttft, 50), 1), "ttft_p90_ms": round(_pct(ttft, 90), 1),
        "ttft_p99_ms": round(_pct(ttft, 99), 1),
        "tpot_p50_ms": round(_pct(tpot, 50), 1), "tpot_p99_ms": round(_pct(tpot, 99), 1),
        "peak_kv_bytes": None,
        "prefix_hit_rate": round(sum(r["cached_tokens"] for r in results) / max(prompt_tokens, 1), 4),
        "seconds": round(seconds, 2),
        **({"ttft_cold_ms": round(_pct(cold, 50), 1), "ttft_hit_ms": round(_pct(hit, 50), 1)} if idle else {}),
    }


def run_serve_url(url: str, cfg: ServeConfig, model: str | None = None, api_key: str | None = None,
                  vocab_size: int = 32000, progress: bool = True) -> dict[str, Any]:
    """:func:`run_url` on the benchmark's workload (token ids below ``vocab_size``, skipping the first 100
    ids where tokenizers keep their special tokens)."""
    from tqdm import tqdm

    work = make_workload(cfg, vocab_size, set(range(100)))
    result: dict[str, Any] = {"model": model or "(server default)", "url": url, "torch": torch.__version__,
                              "device": "server", "dtype": "server", "config": cfg.as_dict(),
                              "date": time.strftime("%Y-%m-%d"), "rows": []}
    with tqdm(total=cfg.requests + 1, disable=not progress, desc=f"bench serve: {url}", unit="req") as bar:
        result["rows"].append(run_url(url, cfg, work, model, api_key, bar, vocab_size))
    return result


def run_serve(loaded: LoadedModel, cfg: ServeConfig, systems: list[str], progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    special = set(getattr(loaded.tokenizer, "all_special_ids", []) or [])
    work = make_workload(cfg, loaded.config.vocab_size, special)
    result: dict[str, Any] = {"model": loaded.source, "device": str(loaded.model.lm_head.weight.device),
                              "dtype": str(loaded.model.lm_head.weight.dtype), "torch": torch.__version__,
                              "config": cfg.as_dict(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for system in systems:
        with tqdm(total=cfg.requests, disable=not progress, desc=f"bench serve: {system}", unit="req") as bar:
            if system == "hf":
                row = run_hf(loaded, cfg, work)
                bar.update(cfg.requests)
            else:
                row = run_engine(loaded, cfg, work, sharing=system == "chunkattn", progress=bar)
        result["rows"].append(row)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["| system | out tok/s | decode tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | peak KV MiB | "
             "prefix hit | TTFT idle cold / hit ms |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        idle = f"{r['ttft_cold_ms']} / {r['ttft_hit_ms']}" if "ttft_cold_ms" in r else "-"
        kv = "-" if r["peak_kv_bytes"] is None else f"{r['peak_kv_bytes'] / 2**20:.1f}"
        decode = "-" if r["decode_tokens_per_s"] is None else r["decode_tokens_per_s"]
        lines.append(f"| {r['system']} | {r['output_tokens_per_s']} | {decode} | "
                     f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['tpot_p50_ms']} / {r['tpot_p99_ms']} | "
                     f"{kv} | {r['prefix_hit_rate']:.1%} | {idle} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()

    rows = result["rows"]
    names = [r["system"] for r in rows]
    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
              ("tpot_p50_ms", "TPOT p50 (ms)"), ("peak_kv_bytes", "peak KV (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
    for ax, (key, label) in zip(axes, panels):
        values = [0 if r[key] is None else r[key] / 2**20 if key == "peak_kv_bytes" else r[key] for r in rows]
        ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:gray"][: len(names)])
        ax.set_title(label)
    fig.suptitle(f"chunkattn bench serve: {result['config']['requests']} requests, "
                 f"{result['config']['shared_len']}-token shared prompt ({result['device']}, {result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """The ratios the README quotes: sharing vs no sharing."""
    by = {r["system"]: r for r in result["rows"]}
    if "chunkattn" not in by or "no-sharing" not in by:
        return ""
    a, b = by["chunkattn"], by["no-sharing"]
    parts = [f"decode throughput {a['decode_tokens_per_s'] / max(b['decode_tokens_per_s'], 1e-9):.2f}x",
             f"peak KV {100 * (1 - a['peak_kv_bytes'] / max(b['peak_kv_bytes'], 1)):.1f}% lower",
             f"idle TTFT cold/hit {a['ttft_cold_ms'] / max(a['ttft_hit_ms'], 1e-9):.1f}x"]
    return "sharing vs no sharing: " + ", ".join(parts)
