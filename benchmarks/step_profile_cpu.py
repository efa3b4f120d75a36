"""Where an engine step's time goes on the CPU: issue 7's step-time breakdown (model products, attention, the
elementwise layers, sampling, scheduling, Python), for the prefill step and the decode steps of a serve workload.

Runs the `chunkattn bench serve` workload (row a by default: 32 requests on one 1024-token system prompt, 64-token
questions, 64 output tokens, greedy) through the engine step by step, one step at a time under the PyTorch
profiler, and sorts the profiler's CPU time of each op into categories. "python + other" is the step's wall time
minus the ops' self time: Python, scheduling, tensor set-up, everything not inside a profiled op.

    python benchmarks/step_profile_cpu.py [--shared-len 1024] [--dtype float32] [--decode-steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from chunkattn.bench.serve import ServeConfig, make_workload
from chunkattn.engine.llm import LLM
from chunkattn.engine.sampling import SamplingParams
from chunkattn.model import load_model

# op name (profiler key) substring -> category; first match wins
CATEGORIES = [
    ("products", ("chunkattn_layers::linear", "chunkattn_layers::linear_silu_mul", "mkldnn::_linear_pointwise",
                  "aten::linear", "aten::addmm", "aten::mm", "aten::matmul")),
    ("attention", ("chunkattn_cpu::", "tpp")),
    ("elementwise layers", ("rope_", "add_rms_norm_", "silu_and_mul", "aten::rms_norm", "aten::silu")),
    ("sampling", ("argmax_rows", "aten::argmax", "aten::softmax", "aten::topk", "aten::multinomial", "aten::sort")),
    ("K/V writes", ("aten::index_copy", "aten::index_put", "aten::copy_")),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other ops"


def profiled_step(engine) -> tuple[float, dict[str, float], dict[str, float]]:  # noqa: ANN001
    """One engine step under the profiler: (wall ms, ms per category, ms per op)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        engine.step()
        wall = (time.perf_counter() - t0) * 1e3
    per_cat: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        ms = evt.self_cpu_time_total / 1e3
        per_cat[category(evt.key)] += ms
        per_op[evt.key] += ms
    return wall, per_cat, per_op


def report(title: str, walls: list[float], cats: list[dict[str, float]], ops: list[dict[str, float]]) -> None:
    n = len(walls)
    wall = sum(walls) / n
    print(f"\n{title}: {n} step(s), {wall:.1f} ms a step (wall, under the profiler)")
    total: dict[str, float] = defaultdict(float)
    for c in cats:
        for k, v in c.items():
            total[k] += v / n
    profiled = sum(total.values())
    for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<20} {v:8.2f} ms  {100 * v / wall:5.1f}%")
    print(f"  {'python + other':<20} {wall - profiled:8.2f} ms  {100 * (wall - profiled) / wall:5.1f}%")
    top: dict[str, float] = defaultdict(float)
    for o in ops:
        for k, v in o.items():
            top[k] += v / n
    print("  top ops: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-prompts", type=int, default=1)
    ap.add_argument("--shared-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=10, help="decode steps profiled (after the prefill)")
    args = ap.parse_args()

    loaded = load_model(args.model, dtype=getattr(torch, args.dtype))
    cfg = ServeConfig(requests=args.requests, system_prompts=args.system_prompts, shared_len=args.shared_len,
                      question_len=args.question_len, output_len=args.decode_steps + 2)
    special = set(getattr(loaded.tokenizer, "all_special_ids", []) or [])
    work = make_workload(cfg, loaded.config.vocab_size, special)
    llm = LLM.from_args(dataclasses.replace(cfg.engine, max_num_seqs=max(cfg.engine.max_num_seqs, cfg.requests)),
                        loaded=loaded)
    llm.generate(work.prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up, as bench serve does
    engine = llm.engine
    params = SamplingParams(max_tokens=cfg.output_len, temperature=0, ignore_eos=True)
    engine.add_requests([(p, params, None) for p in work.prompts])
    prefill: tuple[list, list, list] = ([], [], [])
    decode: tuple[list, list, list] = ([], [], [])
    while engine.num_unfinished > 0:
        computed, produced = engine.stats.computed_tokens, engine.stats.output_tokens
        wall, cats, ops = profiled_step(engine)
        # a decode step computes one token per sequence, each producing one; a step with prompt tokens computes more
        is_prefill = engine.stats.computed_tokens - computed > engine.stats.output_tokens - produced
        bucket = prefill if is_prefill else decode
        if is_prefill or len(decode[0]) < args.decode_steps:
            for lst, v in zip(bucket, (wall, cats, ops)):
                lst.append(v)
    print(f"{loaded.source} {args.dtype}, {torch.get_num_threads()} threads; workload: {args.requests} requests x "
          f"({args.shared_len} shared + {args.question_len}) tokens, {args.system_prompts} system prompt(s)")
    report("steps that prefill", *prefill)
    report("decode steps", *decode)


if __name__ == "__main__":
    main()
