"""Engine replicas on Ray Serve behind one OpenAI-compatible ingress and a prefix-aware request router.

Needs the ``cluster`` extra (``pip install -e ".[cluster]"``: Ray Serve, pinned). The pieces::

    HTTP client -> Ray Serve proxy -> OpenAIIngress (chunkattn.server.Server over a ClusterEngine)
                                        | DeploymentHandle, routed by PrefixRouter (chunkattn.cluster.Router)
                                        v
                                   EngineReplica x N (an LLM each, stepped on its own thread)

* :class:`EngineReplica` (a deployment): one engine; streams :func:`~chunkattn.cluster.wire.slim` outputs;
  reports queue length, free chunks and the block hashes of its cached prefixes (``record_routing_stats``);
  fails Ray's health check once its engine failed (Ray then replaces it).
* :class:`PrefixRouter` (a Ray Serve ``RequestRouter``): the Ray-free :class:`~chunkattn.cluster.Router`
  with the policy of your choice (prefix-aware, round-robin, power-of-two). It lives in the ingress's
  process (where the handle is); the request it routes is a :class:`ReplicaRequest` (token ids first).
* :class:`OpenAIIngress` (a deployment): the single server's :class:`~chunkattn.server.Server` (routes,
  streaming, errors, auth, metrics) over a :class:`ClusterEngine`, which submits through the handle, rebuilds
  full outputs and retries a request once on another replica when its replica died before sending anything.

:func:`build_app` makes the Serve application, :func:`run_cluster` starts it and serves until interrupted
(``chunkattn serve --replicas N``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from chunkattn.cluster.ray_router import PrefixRouter
from chunkattn.cluster.router import make_policy
from chunkattn.cluster.wire import OutputAssembler, ReplicaRequest, ToReplica, slim
from chunkattn.engine.args import SERVING_KV_CACHE_TOKENS, EngineArgs
from chunkattn.engine.engine import check_cache_salt, encode
from chunkattn.engine.request import ErrorCode, RequestMetrics, RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.server.app import Server, ServerConfig
from chunkattn.server.engine_client import EngineClient
from chunkattn.server.metrics import EngineSnapshot

log = logging.getLogger("chunkattn.cluster")

#: Ray's own prefix-affinity router (ray.llm's, character-level); a baseline for benchmarks.
RAY_PREFIX_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:"
                     "PrefixCacheAffinityRouter")
ROUTERS = ("prefix-aware", "round-robin", "power-of-two", "ray-prefix")


@dataclass(kw_only=True)
class EngineSpec(EngineArgs):
    """What each replica loads and how its engine is sized: an :class:`~chunkattn.engine.args.EngineArgs`
    (``kv_cache_tokens`` defaults to :data:`~chunkattn.engine.args.SERVING_KV_CACHE_TOKENS` here, as in
    ``chunkattn serve``) and ``threads``: torch threads per replica (None or 0: this machine's cores / replicas,
    at least 1). Ray pickles it to every replica."""

    kv_cache_tokens: int = SERVING_KV_CACHE_TOKENS
    threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 0):
            raise ValueError(f"threads must be an int >= 0 or None (0: as None), got {self.threads!r}")

    @classmethod
    def from_engine_args(cls, args: EngineArgs, threads: int | None = None) -> EngineSpec:
        """``args`` (every field, its ``kv_cache_tokens`` included) for replicas of ``threads`` threads."""
        return cls(**args.engine_kwargs(), threads=threads)


@dataclass
class ClusterConfig:
    """``replicas``: engine replicas; ``router``: one of :data:`ROUTERS`; ``router_options``: the policy's
    keyword arguments (e.g. ``balance_abs``); ``stats_period_s``: how often replicas report to the routers;
    ``max_ongoing_requests``: per replica (beyond it Ray queues at the router); ``replica_cpus``: logical
    CPUs Ray reserves per replica; ``retries``: resubmissions of a request whose replica died before it sent
    anything."""

    replicas: int = 2
    router: str = "prefix-aware"
    router_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats_period_s: float = 1.0
    max_ongoing_requests: int = 256
    replica_cpus: float = 0.0
    retries: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose from {list(ROUTERS)}")


@dataclass
class ReplicaInfo:
    """A replica's engine as the ingress needs it."""

    vocab_size: int
    max_model_len: int
    chunk_size: int
    num_chunks: int


class EngineReplica:
    """One engine. The model is loaded, and the engine stepped, on a thread of its own (OpenMP stays on one
    thread, see :mod:`chunkattn.server.run`); requests come in on Ray's event loop."""

    def __init__(self, spec: EngineSpec, block_size: int, num_replicas: int = 1):
        self.spec = spec
        self.block_size = block_size
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.llm: Any = None
        threads = spec.threads or max(1, (os.cpu_count() or 1) // num_replicas)
        self._thread = threading.Thread(target=self._drive, args=(threads,), name="chunkattn-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise RuntimeError(f"the replica could not load its engine: {self._load_error}") from self._load_error
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except ray.serve.exceptions.RayServeException:  # constructed outside Ray Serve (tests)
            self.replica_id = f"local-{id(self):x}"

    def _drive(self, threads: int) -> None:
        import torch

        from chunkattn.engine.llm import LLM

        try:
            torch.set_num_threads(threads)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.llm = LLM.from_args(self.spec)
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.llm.loop.drive(self._stop.is_set)
        except BaseException:  # (a step's own failures fail its requests; this is a bug: fail the health check)
            log.exception("the engine thread stopped")
            raise

    def __del__(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ called by the ingress
    def info(self, _: ToReplica | None = None) -> ReplicaInfo:
        engine = self.llm.engine
        return ReplicaInfo(int(engine.model.config.vocab_size), engine.max_model_len,
                           engine.cache.chunk_size, engine.cache.num_slots)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[tuple[str, RequestOutput]]:
        """``(this replica's id, output)`` per output of the request, slimmed (:func:`~chunkattn.cluster.wire.slim`).
        Cancelling the call (the client left) aborts the request in the engine."""
        from chunkattn.engine.llm import AsyncLLM
        from chunkattn.server.engine_client import compile_off_loop

        await compile_off_loop(self.llm.engine, request.params)  # (not on Ray's event loop)
        stream = AsyncLLM(self.llm).submit(request.token_ids, request.params, request.request_id,
                                           request.cache_salt)
        first = True
        try:
            async for out in stream:
                yield self.replica_id, slim(out, first)
                first = False
        finally:
            stream.abort()

    async def _on_engine(self, fn: Any, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self.llm.loop.call(fn)), timeout)

    async def snapshot(self, _: ToReplica | None = None) -> tuple[str, EngineSnapshot]:
        from chunkattn.server.metrics import engine_snapshot

        return self.replica_id, await self._on_engine(lambda: engine_snapshot(self.llm.engine))

    async def reset_prefix_cache(self, _: ToReplica | None = None) -> int:
        return int(await self._on_engine(self.llm.engine.cache.evict_all))

    # ------------------------------------------------------------------ called by Ray Serve
    async def record_routing_stats(self) -> dict[str, Any]:
        """What the routers correct their estimates with (see :class:`~chunkattn.cluster.RoutingStats`)."""
        engine = self.llm.engine
        cache = engine.cache
        capacity_blocks = cache.num_slots * cache.chunk_size // self.block_size

        def read() -> dict[str, Any]:
            return {"queue_len": len(engine.scheduler.running) + len(engine.scheduler.waiting),
                    "free_blocks": cache.num_free_chunks * cache.chunk_size // self.block_size,
                    "held_blocks": cache.block_hashes(self.block_size, capacity_blocks),
                    "capacity_tokens": cache.num_slots * cache.chunk_size, "time": time.time()}

        return await self._on_engine(read)

    def health(self, _: ToReplica | None = None) -> str | None:
        """Why this replica serves no requests (None: it does); what the ingress's /health reports."""
        if not self.llm.engine.is_healthy:
            return f"the engine failed: {self.llm.engine.error}"
        if not self._thread.is_alive():
            return "the engine thread stopped"
        return None

    def check_health(self) -> None:
        """Ray Serve calls it periodically and replaces the replica when it raises."""
        engine = self.llm.engine
        if not engine.is_healthy:
            raise RuntimeError(f"the engine failed: {engine.error}")
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread stopped")


def _call(method: Any, *args: Any) -> Any:
    """``method.remote(*args)`` as a request of its own. Ray Serve gives every handle call made while serving
    one request that request's internal id, and its router fulfils pending requests by that id: two concurrent
    calls (the prompts of one completion request, /metrics asking each replica) would collide and one would
    wait forever. (Ray 2.60; a private API, hence the pinned version.)"""
    from ray.serve._private.utils import generate_request_id
    from ray.serve.context import _set_request_context

    def fresh() -> Any:
        _set_request_context(_internal_request_id=generate_request_id())
        return method.remote(*args)

    return contextvars.copy_context().run(fresh)


def _error_output(request: ReplicaRequest, message: str, code: ErrorCode = ErrorCode.ENGINE) -> RequestOutput:
    now = time.perf_counter()
    metrics = RequestMetrics(now, time.time(), None, None, None, now, len(request.token_ids), 0, 0, 0)
    return RequestOutput(request.request_id, None, tuple(request.token_ids), [], True, metrics, error=message,
                         error_code=code)


def _is_replica_gone(exc: BaseException) -> bool:
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class _ReplicaStream:
    """One request's outputs from whichever replica the router picks; retried elsewhere if that replica dies
    before sending anything, failed with an error output otherwise."""

    def __init__(self, handle: DeploymentHandle, request: ReplicaRequest, retries: int,
                 served: dict[str, int]):
        self._handle = handle
        self._served = served
        self._request = request
        self._retries = retries
        self._call: Any = None
        self._aborted = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        attempt = 0
        while not self._aborted:
            assemble = OutputAssembler()
            received = False
            self._call = _call(self._handle.options(stream=True).generate, self._request)
            try:
                async for replica_id, out in self._call:
                    if not received:
                        self._served[replica_id] = self._served.get(replica_id, 0) + 1
                    received = True
                    yield assemble(out)
                    if out.finished:
                        return
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - becomes the request's error
                if _is_replica_gone(exc) and not received and attempt < self._retries and not self._aborted:
                    attempt += 1
                    self._call.cancel()  # (in case it was only unreachable: no duplicate keeps running)
                    log.warning("request %s: replica gone before it answered (%s); retrying",
                                self._request.request_id, type(exc).__name__)
                    continue
                cause = exc.as_instanceof_cause() if isinstance(exc, ray.exceptions.RayTaskError) else exc
                if not received and isinstance(cause, (ValueError, TypeError)):  # the replica's engine refused it
                    message = str(exc.cause) if isinstance(exc, ray.exceptions.RayTaskError) else str(exc)
                    yield _error_output(self._request, message, ErrorCode.INVALID_REQUEST)
                    return
                what = "the replica serving it failed" if _is_replica_gone(exc) else "the replica raised"
                yield _error_output(self._request, f"{what}: {type(cause).__name__}: {cause}")
                return

    def abort(self) -> None:
        self._aborted = True
        if self._call is not None:
            self._call.cancel()


class ClusterEngine(EngineClient):
    """The replicas behind ``handle`` as one engine for :class:`~chunkattn.server.Server`. Limits (context,
    cache size) are those of one replica: a request must fit in the replica it reaches."""

    def __init__(self, handle: DeploymentHandle, info: ReplicaInfo, tokenizer: Any, num_replicas: int,
                 retries: int = 1):
        self.handle = handle
        self.tokenizer = tokenizer
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        self.chunk_size = info.chunk_size
        self.num_chunks = info.num_chunks
        self.num_replicas = num_replicas
        self.retries = retries
        self.served: dict[str, int] = {}  # replica id -> requests it answered (through this ingress)
        self._health: tuple[float, str | None] = (-1e9, None)  # (when, what /health said)

    @property
    def error(self) -> str | None:
        return None  # a failed replica fails Ray's health check and is replaced; requests on it get errors

    async def health(self) -> str | None:
        """None while at least one replica answers that it is healthy (cached for a second)."""
        now = time.monotonic()
        if now - self._health[0] < 1.0:
            return self._health[1]
        answers = await self._each_replica("health", timeout=5.0)
        ok = sum(a is None for a in answers)
        problem = None if ok else (f"no replica of {self.num_replicas} is healthy: {answers[0]}" if answers else
                                   f"no replica of {self.num_replicas} answered")
        self._health = (time.monotonic(), problem)
        return problem

    def tokenize(self, text: str) -> list[int]:
        return list(encode(self.tokenizer, text))

    def submit(self, token_ids: list[int], params: SamplingParams, request_id: str,
               cache_salt: str | None) -> _ReplicaStream:
        check_cache_salt(cache_salt)
        return _ReplicaStream(self.handle, ReplicaRequest(list(token_ids), params, request_id, cache_salt),
                              self.retries, self.served)

    async def _each_replica(self, method: str, timeout: float = 10.0) -> list[Any]:
        """``method`` called on every replica (as far as they answer within ``timeout``)."""
        calls = [_call(getattr(self.handle, method), ToReplica(i)) for i in range(self.num_replicas)]
        done = await asyncio.gather(*(asyncio.wait_for(c, timeout) for c in calls),
                                    return_exceptions=True)
        for d in done:
            if isinstance(d, BaseException):
                log.warning("%s on a replica failed: %s: %s", method, type(d).__name__, d)
        return [d for d in done if not isinstance(d, BaseException)]

    async def snapshot(self, previous: EngineSnapshot) -> EngineSnapshot | None:
        answers = await self._each_replica("snapshot")
        if not answers:
            return None
        total = sum_snapshots([snapshot for _, snapshot in answers])
        total.replica_requests = dict(self.served)
        return total

    async def reset_prefix_cache(self) -> int:
        return sum(await self._each_replica("reset_prefix_cache"))


def sum_snapshots(snapshots: Sequence[EngineSnapshot]) -> EngineSnapshot:
    """Replicas' snapshots as one: counts add up, K/V usage is the mean, healthy/check-ok only if all are."""
    total = EngineSnapshot()
    for s in snapshots:
        for f in ("running", "waiting", "prompt_tokens", "cached_prompt_tokens", "generation_tokens",
                  "preemptions", "live_chunks", "cached_chunks", "free_chunks", "kv_shared_bytes", "kv_saved_bytes",
                  "structured_requests", "mask_seconds", "mask_steps", "forced_tokens"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        total.grammar_compile_seconds += s.grammar_compile_seconds
        for reason, count in s.finished.items():
            total.finished[reason] = total.finished.get(reason, 0) + count
    total.kv_usage = sum(s.kv_usage for s in snapshots) / max(len(snapshots), 1)
    total.healthy = all(s.healthy for s in snapshots)
    checks = [s.cache_ok for s in snapshots if s.cache_ok is not None]
    total.cache_ok = all(checks) if checks else None
    return total


@serve.ingress()
class OpenAIIngress:
    """The HTTP front: :class:`~chunkattn.server.Server` over the replicas."""

    async def __init__(self, replicas: DeploymentHandle, spec: EngineSpec,  # type: ignore[misc]
                       config: ServerConfig, num_replicas: int, retries: int = 1):
        # (Ray Serve awaits an async constructor: the replicas' limits are fetched before serving)
        from chunkattn.model import load_tokenizer

        info: ReplicaInfo = await replicas.info.remote(ToReplica(0))
        tokenizer = None
        if spec.tokenizer is not None or not spec.random_weights:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            tokenizer = load_tokenizer(spec.tokenizer or spec.model)
        tokenizer = spec.with_chat_template(tokenizer)  # (chat prompts are built here, not on the replicas)
        self.engine = ClusterEngine(replicas, info, tokenizer, num_replicas, retries)
        self.server = Server(self.engine, config)

    def __serve_build_asgi_app__(self) -> Any:
        return self.server.app()

    async def drain(self, timeout: float) -> int:
        """Graceful shutdown of the HTTP side (see :meth:`chunkattn.server.Server.drain`)."""
        return await self.server.drain(timeout)

    def end_now(self) -> None:
        """End a :meth:`drain`'s wait: the requests still in flight end with an error."""
        self.server.end_now = True


def build_app(spec: EngineSpec, cluster: ClusterConfig, config: ServerConfig, shutdown_timeout: float = 30.0) -> Any:
    """The Serve application: ``cluster.replicas`` engine replicas behind one ingress. ``shutdown_timeout``:
    how long Ray Serve lets a stopping ingress or replica finish its requests (its graceful shutdown)."""
    graceful: dict[str, Any] = {"graceful_shutdown_timeout_s": shutdown_timeout + 5.0,
                                "graceful_shutdown_wait_loop_s": 0.5}
    router: dict[str, Any] = {"request_routing_stats_period_s": cluster.stats_period_s}
    if cluster.router == "ray-prefix":
        router["request_router_class"] = RAY_PREFIX_ROUTER
    else:
        make_policy(cluster.router, **cluster.router_options)  # bad options fail here, not in the routers
        router["request_router_class"] = PrefixRouter
        router["request_router_kwargs"] = {"policy": cluster.router, "block_size": spec.chunk_size,
                                           "capacity_tokens": spec.kv_cache_tokens,
                                           "recent_s": 2 * cluster.stats_period_s + 3.0, **cluster.router_options}
    replica = serve.deployment(name="engine", num_replicas=cluster.replicas,
                               max_ongoing_requests=cluster.max_ongoing_requests,
                               ray_actor_options={"num_cpus": cluster.replica_cpus},
                               request_router_config=RequestRouterConfig(**router), **graceful)(EngineReplica)
    ingress = serve.deployment(name="ingress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0}, **graceful)(OpenAIIngress)
    return ingress.bind(replica.bind(spec, spec.chunk_size, cluster.replicas), spec, config, cluster.replicas,
                        cluster.retries)


def start_cluster(spec: EngineSpec, cluster: ClusterConfig, config: ServerConfig, host: str = "127.0.0.1",
                  port: int = 8000, address: str | None = None, app_name: str = "chunkattn",
                  shutdown_timeout: float = 30.0) -> DeploymentHandle:
    """Start (or join, with ``address``) a Ray cluster, deploy the application and serve HTTP on
    ``host:port``; returns the ingress's handle once every replica is up. Stop with :func:`stop_cluster`."""
    _init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(spec, cluster, config, shutdown_timeout), name=app_name, route_prefix="/")


def _init_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def stop_cluster() -> None:
    """Shut Serve down, and Ray too if this process started it."""
    serve.shutdown()
    ray.shutdown()


def run_cluster(spec: EngineSpec, cluster: ClusterConfig, config: ServerConfig, host: str = "127.0.0.1",
                port: int = 8000, address: str | None = None, shutdown_timeout: float = 30.0) -> None:
    """:func:`start_cluster`, then serve until SIGTERM or Ctrl-C; then shut down gracefully as
    :func:`chunkattn.server.run_server` does (the ingress drains: new requests 503, those in flight get
    ``shutdown_timeout`` seconds, then an error; a second signal ends them at once), and stop Serve."""
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    stop = threading.Event()
    ready = threading.Event()
    signals = [0]
    previous: dict[int, Any] = {}

    def on_signal(signum: int, _: Any) -> None:
        signals[0] += 1
        # A third signal stops at once; so does a second while Serve is still starting (the first one waits for
        # it: /health may already answer while serve.run has not returned, and requests may be in flight).
        if signals[0] >= 3 or (signals[0] >= 2 and not ready.is_set()):
            raise KeyboardInterrupt
        stop.set()

    try:
        _init_ray(address)  # (it installs a SIGTERM handler of its own, which would end us uncleanly: ours after)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        ingress = start_cluster(spec, cluster, config, host, port, address, shutdown_timeout=shutdown_timeout)
        ready.set()
        log.info("ready: %d replicas (%s router) serving on http://%s:%d", cluster.replicas, cluster.router, host,
                 port)
        print(f"chunkattn: {cluster.replicas} replicas ({cluster.router} router) serving on http://{host}:{port}",
              flush=True)
        while not stop.wait(1.0):
            pass
        log.info("shutting down: the requests in flight get up to %g s to finish (--shutdown-timeout); new "
                 "requests get 503", shutdown_timeout)
        _drain(ingress, shutdown_timeout, lambda: signals[0] > 1)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping without draining")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_cluster()
    log.info("stopped")


def _drain(ingress: DeploymentHandle, timeout: float, hurry: Any) -> None:
    """The ingress's graceful shutdown, from the driver; ``hurry()`` (a second signal) ends it early."""
    response = ingress.drain.remote(timeout)
    deadline = time.monotonic() + timeout + 30.0
    hurried = False
    while time.monotonic() < deadline:
        if hurry() and not hurried:
            hurried = True
            ingress.end_now.remote()
        try:
            ended = response.result(timeout_s=0.5)
        except TimeoutError:
            continue
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("the ingress could not drain: %s: %s", type(exc).__name__, exc)
            return
        if ended:
            log.warning("ended %d request(s) still running after %g s with an error", ended, timeout)
        return
    log.warning("the ingress did not drain in time")


__all__ = ["ROUTERS", "ClusterConfig", "ClusterEngine", "EngineReplica", "EngineSpec", "OpenAIIngress",
           "PrefixRouter", "ReplicaInfo", "ReplicaRequest", "ToReplica", "build_app", "run_cluster",
           "start_cluster", "stop_cluster", "sum_snapshots"]
