"""The ``chunkattn`` command line: ``chunkattn bench kernel ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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
    from chunkattn.bench.kernel import configs_from_lists, format_table, plot, run_sweep, write_json

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
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkattn", description="Prefix-aware KV cache and attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _add_kernel_bench(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as exc:
        print(f"chunkattn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
