"""Combine the per-run JSON files of the vLLM CPU peer benchmark into one JSON and one PNG (issue 7).

Run with the Python where chunkattn is installed (peer_vllm_cpu.sh does):

    python benchmarks/peer_vllm_report.py --runs /work/peer/runs/<stamp> --json out.json --plot out.png
    python benchmarks/peer_vllm_report.py --kernel-runs /work/peer/runs/kernel-<stamp> --json out-kernel.json

End to end, ``--runs`` holds ``vllm-<dtype>-<row>-<run>.json`` (benchmarks/peer_vllm_serve.py) and
``chunkattn-<dtype>-<row>-<run>.json`` (``chunkattn bench serve --json``). Each (dtype, row) gets every run's
numbers, the median/min/max per metric and system, chunkattn/vLLM ratios, and the issue's targets checked on the
medians. In float32 it also checks that chunkattn's greedy tokens equal vLLM's for the first requests: from
chunkattn's JSON when it holds token ids, otherwise by generating those few requests with chunkattn here.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROWS = {"a": "1 system prompt x 1024 tokens", "b": "1 system prompt x 4096 tokens", "c": "8 system prompts x 1024"}
# Higher is better for these; lower for every other metric compared.
HIGHER = {"output_tokens_per_s", "decode_tokens_per_s"}
METRICS = ("seconds", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
           "ttft_cold_ms", "ttft_hit_ms")


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "n": len(values)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max of each metric over the runs, for every numeric field the rows share (tolerant of fields
    one side has and the other has not)."""
    out: dict[str, Any] = {}
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in rows)]
    for k in keys:
        out[k] = _spread([float(r[k]) for r in rows])
    return out


def _targets(row: str, vllm: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Issue 7's end-to-end targets on the medians: tok/s >= 1.2x vLLM's, TTFT/TPOT p50 and idle TTFT <= vLLM's,
    and on the 4096-token row TPOT p50 <= 0.7x vLLM's."""
    def med(side: dict[str, Any], key: str) -> float | None:
        return side[key]["median"] if key in side else None

    checks: dict[str, Any] = {}

    def check(name: str, key: str, factor: float, higher: bool) -> None:
        a, b = med(ours, key), med(vllm, key)
        if a is None or b is None:
            return
        ok = a >= factor * b if higher else a <= factor * b
        checks[name] = {"chunkattn": a, "vllm": b, "ratio": round(a / b, 3) if b else None, "ok": ok}

    check("output tok/s >= 1.2x", "output_tokens_per_s", 1.2, True)
    check("TTFT p50 <= 1x", "ttft_p50_ms", 1.0, False)
    if row == "b":  # the 4096-token prompt: shared-prefix attention dominates the decode step
        check("TPOT p50 <= 0.7x", "tpot_p50_ms", 0.7, False)
    else:
        check("TPOT p50 <= 1x", "tpot_p50_ms", 1.0, False)
    check("idle TTFT cold <= 1x", "ttft_cold_ms", 1.0, False)
    check("idle TTFT hit <= 1x", "ttft_hit_ms", 1.0, False)
    checks["all_ok"] = all(v["ok"] for v in checks.values())
    return checks


def _chunkattn_tokens(vllm_json: dict[str, Any], n: int) -> tuple[list[list[int]] | None, str]:
    """chunkattn's greedy ids for the first ``n`` prompts of the vLLM run's workload (float32), generated here."""
    try:
        import torch

        from chunkattn import LLM, SamplingParams
        from chunkattn.bench.serve import ServeConfig, make_workload

        cfg = ServeConfig.from_dict(vllm_json["config"])
        work = make_workload(cfg, vllm_json["vocab_size"], set(vllm_json["special_ids"]))
        llm = LLM(dtype=torch.float32)
        outs = llm.generate(work.prompts[:n], SamplingParams(max_tokens=cfg.output_len, temperature=0,
                                                             ignore_eos=True))
        return [list(o.token_ids) for o in outs], f"generated here: the first {n} requests as one batch of {n}"
    except Exception as exc:  # noqa: BLE001 - the engine is being rewritten; a failed check must not cost the report
        return None, f"could not generate chunkattn's tokens: {exc!r}"


def _compare_tokens(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    first_diff = []
    for x, y in zip(a, b):
        d = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        first_diff.append(d if d is not None or len(x) == len(y) else min(len(x), len(y)))
    return {"equal": all(x == y for x, y in zip(a, b)) and len(a) == len(b), "first_mismatch": first_diff}


def serve_report(runs: Path, check_tokens: bool) -> dict[str, Any]:
    pattern = re.compile(r"^(vllm|chunkattn)-(\w+)-(\w+)-(\d+)\.json$")
    found: dict[tuple[str, str], dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for f in sorted(runs.iterdir()):
        m = pattern.match(f.name)
        if m:
            system, dtype, row, run = m.group(1), m.group(2), m.group(3), int(m.group(4))
            bucket = found.setdefault((dtype, row), {"vllm": [], "chunkattn": []})
            bucket[system].append((run, json.loads(f.read_text())))
    if not found:
        raise SystemExit(f"no vllm-*/chunkattn-*.json run files in {runs}")
    result: dict[str, Any] = {"benchmark": "peer-vllm-cpu (issue 7)", "date": time.strftime("%Y-%m-%d"),
                              "runs_dir": str(runs), "rows": []}
    if (runs / "meta.json").exists():  # written by peer_vllm_cpu.sh: which chunkattn, the knobs, the env
        result["sweep"] = json.loads((runs / "meta.json").read_text())
    for (dtype, row), sides in sorted(found.items(), key=lambda kv: (kv[0][0] != "float32", kv[0])):
        vruns = [d for _, d in sorted(sides["vllm"], key=lambda t: t[0])]
        cruns = [d for _, d in sorted(sides["chunkattn"], key=lambda t: t[0])]
        if vruns and "versions" not in result:
            for key in ("versions", "machine", "env", "vllm_config"):
                result[key] = vruns[0].get(key)
        if cruns:
            result.setdefault("chunkattn_torch", cruns[0].get("torch"))
        vrows = [d["rows"][0] for d in vruns]
        # chunkattn's JSON has one row per system; take the one named chunkattn (the only one we ask for).
        crows = [next((r for r in d["rows"] if r.get("system") == "chunkattn"), d["rows"][0]) for d in cruns]
        entry: dict[str, Any] = {
            "row": row, "workload": ROWS.get(row, row), "dtype": dtype,
            "config": (vruns or cruns)[0].get("config"),
            "vllm": {"runs": vrows, "summary": _summary(vrows) if vrows else {}},
            "chunkattn": {"runs": crows, "summary": _summary(crows) if crows else {}},
        }
        if vrows and crows:
            entry["targets"] = _targets(row, entry["vllm"]["summary"], entry["chunkattn"]["summary"])
        if vruns:
            entry["vllm_output_token_ids"] = vruns[0].get("output_token_ids")
        if dtype == "float32" and vruns and vruns[0].get("output_token_ids"):
            vt = vruns[0]["output_token_ids"]
            ct = next((d.get("output_token_ids") or r.get("output_token_ids") for d, r in zip(cruns, crows)
                       if d.get("output_token_ids") or r.get("output_token_ids")), None)
            source = "chunkattn bench serve JSON"
            if ct is None and check_tokens:
                ct, source = _chunkattn_tokens(vruns[0], len(vt))
            elif ct is None:
                source = "not checked: chunkattn's JSON holds no token ids (--no-check-tokens)"
            entry["greedy_tokens_vs_chunkattn"] = {"source": source, **(_compare_tokens(vt, ct[: len(vt)]) if ct
                                                                       else {"equal": None})}
            if ct:
                entry["chunkattn_output_token_ids"] = ct[: len(vt)]
        result["rows"].append(entry)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["| row | dtype | system | runs | wall s | output tok/s | TTFT p50 ms | TPOT p50 ms "
             "| idle TTFT cold / hit ms |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(s: dict[str, Any], key: str) -> str:
        if key not in s:
            return "-"
        v = s[key]
        return f"{v['median']:g}" if v["min"] == v["max"] else f"{v['median']:g} ({v['min']:g}-{v['max']:g})"

    for e in result["rows"]:
        for system in ("vllm", "chunkattn"):
            s = e[system]["summary"]
            if not s:
                continue
            lines.append(f"| {e['row']}: {e['workload']} | {e['dtype']} | {system} | {s['seconds']['n']} | "
                         f"{cell(s, 'seconds')} | {cell(s, 'output_tokens_per_s')} | {cell(s, 'ttft_p50_ms')} | "
                         f"{cell(s, 'tpot_p50_ms')} | {cell(s, 'ttft_cold_ms')} / {cell(s, 'ttft_hit_ms')} |")
    for e in result["rows"]:
        t = e.get("targets", {})
        failed = [k for k, v in t.items() if k != "all_ok" and not v["ok"]]
        tok = e.get("greedy_tokens_vs_chunkattn")
        tok_s = f"; greedy tokens equal: {tok['equal']} ({tok['source']})" if tok else ""
        verdict = "all met" if t.get("all_ok") else "missed: " + ", ".join(failed)
        lines.append(f"row {e['row']} {e['dtype']}: targets {verdict}{tok_s}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tokens_per_s", "output tokens/s (higher is better)"), ("ttft_p50_ms", "TTFT p50 ms"),
              ("tpot_p50_ms", "TPOT p50 ms"), ("ttft_cold_ms", "idle TTFT cold ms"),
              ("ttft_hit_ms", "idle TTFT hit ms")]
    entries = result["rows"]
    labels = [f"{e['row']}: {e['workload']}\n{e['dtype']}" for e in entries]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    width = 0.38
    for ax, (key, title) in zip(axes, panels):
        for i, (system, color) in enumerate((("vllm", "tab:gray"), ("chunkattn", "tab:blue"))):
            xs, ys, lo, hi = [], [], [], []
            for j, e in enumerate(entries):
                s = e[system]["summary"].get(key)
                if s:
                    xs.append(j + (i - 0.5) * width)
                    ys.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            ax.bar(xs, ys, width=width, color=color, label="vLLM CPU" if system == "vllm" else "chunkattn",
                   yerr=[lo, hi], capsize=3)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    v = result.get("versions") or {}
    cfg = entries[0].get("config") or {}
    fig.suptitle(f"chunkattn vs vLLM CPU {v.get('vllm', '?')} (torch {v.get('torch', '?')}), "
                 f"{cfg.get('requests')} requests x {cfg.get('output_len')} tokens, rate inf; "
                 f"bars: median of runs, whiskers: min-max ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kernel_report(runs: Path) -> dict[str, Any]:
    """vLLM op rows and chunkattn bench kernel rows on the same shapes, over repeated runs (files ``-r<run>``):
    per shape and provider the median of the runs' medians with min/max, and the ratio to vLLM's op."""
    raw: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for f in sorted(runs.glob("*.json")):
        if not f.name.startswith(("vllm-", "chunkattn-")):
            continue
        d = json.loads(f.read_text())
        side = "vllm" if f.name.startswith("vllm-") else "chunkattn"
        meta.setdefault(side, {k: v for k, v in d.items() if k not in ("rows", "skipped", "errors")})
        if d.get("errors"):
            meta.setdefault("errors", {})[f.name] = d["errors"]
        run = re.search(r"-r(\d+)\.json$", f.name)
        raw += [r | {"run": int(run.group(1)) if run else 1} for r in d["rows"]]
    key = ("batch", "shared", "private", "heads", "kv_heads", "head_dim", "dtype")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in raw:
        groups.setdefault(tuple(r[k] for k in key) + (r["provider"],), []).append(r)
    rows: list[dict[str, Any]] = []
    for runs_of in groups.values():
        times = [r["median_us"] for r in runs_of]
        rows.append(runs_of[0] | {"median_us": round(statistics.median(times), 2), "min_us": min(times),
                                  "max_us": max(times), "runs_us": times,
                                  "rel_err": max(r["rel_err"] for r in runs_of)})
        rows[-1].pop("run", None)
    # Shape by shape (float32 first, the order), vLLM's op first.
    rows.sort(key=lambda r: (r["dtype"] != "float32", r["dtype"], r["heads"] != 32, r["batch"], r["shared"],
                             r["private"], r["provider"] != "vllm-cpu", r["provider"]))
    vllm = {tuple(r[k] for k in key): r for r in rows if r["provider"] == "vllm-cpu"}
    for r in rows:
        base = vllm.get(tuple(r[k] for k in key))
        if base and r is not base:
            r["vs_vllm"] = round(r["median_us"] / base["median_us"], 3)  # < 1: faster than vLLM's op
    return {"benchmark": "peer-vllm-cpu kernel (issue 7)", "date": time.strftime("%Y-%m-%d"), "runs_dir": str(runs),
            **meta, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, help="folder of the end-to-end per-run JSON files")
    p.add_argument("--kernel-runs", type=Path, help="folder of the kernel per-point JSON files")
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    p.add_argument("--no-check-tokens", action="store_true",
                   help="do not generate chunkattn's greedy tokens when its JSON lacks them")
    args = p.parse_args()
    if args.kernel_runs:
        result = kernel_report(args.kernel_runs)
        for r in result["rows"]:
            n = len(r["runs_us"])
            spread = f" ({r['min_us']:.0f}-{r['max_us']:.0f}, {n} runs)" if n > 1 else ""
            print(f"{r['provider']:>10} B={r['batch']} n_s={r['shared']} n_c={r['private']} H={r['heads']}/"
                  f"{r['kv_heads']} d={r['head_dim']} {r['dtype']}: {r['median_us']:.1f} us{spread} "
                  f"err {r['rel_err']:.1e}" + (f"  {r['vs_vllm']}x vLLM" if "vs_vllm" in r else ""))
    elif args.runs:
        result = serve_report(args.runs, check_tokens=not args.no_check_tokens)
        print(format_table(result))
        if args.plot:
            plot(result, args.plot)
    else:
        p.error("give --runs or --kernel-runs")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot and args.runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
