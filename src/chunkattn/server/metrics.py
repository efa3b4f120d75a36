"""Prometheus metrics of a server, named like vLLM's (``chunkattn:`` instead of ``vllm:``) so dashboards
carry over, plus what only a prefix-sharing cache has: K/V bytes shared and bytes saved by sharing.

Engine-wide values are read on the engine's thread (:func:`engine_snapshot`) when ``/metrics`` is scraped;
latency histograms are observed as requests finish. Each server has its own registry (no global state).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from chunkattn.engine.engine import LLMEngine
from chunkattn.engine.request import RequestMetrics

PREFIX = "chunkattn:"
_COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0)


@dataclass
class EngineSnapshot:
    """Engine-wide numbers at one instant (read on the engine's thread)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # live chunks / all chunks
    prompt_tokens: int = 0  # prompt tokens of admitted requests (= prefix cache queries)
    cached_prompt_tokens: int = 0  # of which found in the cache (= prefix cache hits)
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> completions
    live_chunks: int = 0
    cached_chunks: int = 0
    free_chunks: int = 0
    kv_shared_bytes: int = 0
    kv_saved_bytes: int = 0
    healthy: bool = True
    cache_ok: bool | None = None  # PrefixKVCache.check() passed (run when the engine was idle); None: not run
    replica_requests: dict[str, int] = field(default_factory=dict)  # several replicas: requests each answered
    structured_requests: int = 0  # requests with structured outputs (JSON schema, regex, choice, grammar, tools)
    grammar_compile_seconds: list[float] = field(default_factory=list)  # each distinct spec's compilation
    mask_seconds: float = 0.0  # computing and applying the allowed-token masks, summed over steps
    mask_steps: int = 0
    forced_tokens: int = 0  # tokens jump-forward appended (a decode step each, saved)


def engine_snapshot(engine: LLMEngine, previous: EngineSnapshot | None = None) -> EngineSnapshot:
    """Call on the engine's thread (``EngineLoop.call``): the tree is walked once. When no sequence is live
    the cache's invariants are checked too (cheap then), else the previous result is kept."""
    from chunkattn.errors import CacheCorruptedError

    cache, stats, sched = engine.cache, engine.stats, engine.scheduler
    g = engine.grammars.stats
    cache_ok = previous.cache_ok if previous is not None else None
    if not cache.sequences:
        try:
            cache.check()
            cache_ok = True
        except CacheCorruptedError:
            cache_ok = False
    s = cache.stats()
    per_token = cache.chunk_bytes // cache.chunk_size
    return EngineSnapshot(
        running=len(sched.running), waiting=len(sched.waiting), kv_usage=s["used_chunks"] / s["total_chunks"],
        prompt_tokens=sched.admitted_prompt_tokens, cached_prompt_tokens=sched.admitted_cached_tokens,
        generation_tokens=stats.output_tokens, preemptions=sched.num_preemptions, finished=dict(stats.finished),
        live_chunks=s["used_chunks"], cached_chunks=s["cached_chunks"], free_chunks=s["free_chunks"],
        kv_shared_bytes=s["shared_tokens"] * per_token, kv_saved_bytes=s["saved_tokens"] * per_token,
        healthy=engine.is_healthy, cache_ok=cache_ok, structured_requests=g.requests,
        grammar_compile_seconds=list(g.compile_seconds or []), mask_seconds=g.mask_seconds, mask_steps=g.mask_steps,
        forced_tokens=g.forced_tokens)


class _EngineCollector(Collector):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self.metrics.snapshot
        name = self.metrics.model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("num_requests_running", "Requests being computed (prefill or decode).", s.running)
        yield gauge("num_requests_waiting", "Requests waiting for admission (or preempted).", s.waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of K/V chunks held by live sequences or pins (1 = full).",
                    s.kv_usage)
        yield gauge("kv_cache_live_chunks", "K/V chunks referenced by live sequences or pins.", s.live_chunks)
        yield gauge("kv_cache_cached_chunks", "K/V chunks held only as retained prefixes (evictable).",
                    s.cached_chunks)
        yield gauge("kv_cache_free_chunks", "Empty K/V chunks.", s.free_chunks)
        yield gauge("kv_shared_bytes", "K/V bytes of tokens referenced by two or more live sequences.",
                    s.kv_shared_bytes)
        yield gauge("kv_saved_bytes", "K/V bytes that private copies per sequence would add now (sharing's "
                    "saving).", s.kv_saved_bytes)
        yield gauge("engine_healthy", "1 while the engine serves, 0 once a step failed.", float(s.healthy))
        if s.cache_ok is not None:
            yield gauge("kv_cache_check_ok", "1 if the cache's invariants held when last checked (while idle).",
                        float(s.cache_ok))
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prompt_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.cached_prompt_tokens)
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens)
        yield counter("num_preemptions", "Requests preempted (their K/V freed, to be recomputed).", s.preemptions)
        if s.replica_requests:
            routed = CounterMetricFamily(PREFIX + "replica_requests", "Requests each replica answered.",
                                         labels=["model_name", "replica"])
            for replica, count in sorted(s.replica_requests.items()):
                routed.add_metric([name, replica], count)
            yield routed
        yield counter("structured_requests", "Requests with structured outputs (schema, regex, choice, grammar, "
                      "tools).", s.structured_requests)
        yield counter("structured_mask_seconds", "Seconds computing and applying structured outputs' token masks.",
                      s.mask_seconds)
        yield counter("structured_mask_steps", "Engine steps that computed token masks.", s.mask_steps)
        yield counter("structured_forced_tokens", "Tokens appended by jump-forward (each a decode step saved).",
                      s.forced_tokens)
        compile_hist = HistogramMetricFamily(PREFIX + "structured_grammar_compile_seconds",
                                             "Seconds compiling each distinct structured-output spec.",
                                             labels=["model_name"])
        times = s.grammar_compile_seconds
        compile_hist.add_metric([name], [(str(b), sum(t <= b for t in times)) for b in _COMPILE_BUCKETS] +
                                [("+Inf", len(times))], sum(times))
        yield compile_hist
        finished = CounterMetricFamily(PREFIX + "request_success", "Finished completions by finish reason.",
                                       labels=["model_name", "finished_reason"])
        for reason in ("stop", "length", "abort", "error"):
            finished.add_metric([name, reason], s.finished.get(reason, 0))
        yield finished


class ServerMetrics:
    """The server's Prometheus registry."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot = EngineSnapshot()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(self))
        labels = ["model_name"]

        def histogram(metric: str, doc: str) -> Histogram:
            return Histogram(PREFIX + metric, doc, labels, buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Seconds from arrival to the first token.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean seconds per output token after the first.")
        self.e2e = histogram("e2e_request_latency_seconds", "Seconds from arrival to the last token.")
        self.queue = histogram("request_queue_time_seconds", "Seconds from arrival to first scheduled.")

    def observe(self, m: RequestMetrics) -> None:
        """A request finished: record its latencies."""
        for hist, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e_latency),
                            (self.queue, m.queue_time)):
            if value is not None:
                hist.observe(value)

    def render(self, snapshot: EngineSnapshot | None) -> bytes:
        if snapshot is not None:
            self.snapshot = snapshot
        return generate_latest(self.registry)
