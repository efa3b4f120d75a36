"""Structured outputs on the serve workload: chunkattn with a JSON schema per request vs the same run
unconstrained, and vs vLLM's CPU build with the same schemas (xgrammar, its default backend), on the same
token ids (chunkattn's `bench serve` workload: 32 requests at once, one 1024-token shared prompt + 64 own).

    python benchmarks/structured_serve.py --side chunkattn --dtype bfloat16 --json a.json
    PYTHONPATH=src:benchmarks /work/peer/vllm-venv/bin/python benchmarks/structured_serve.py --side vllm \
        --model /work/peer/smollm2-hf --dtype bfloat16 --json b.json
    python benchmarks/structured_serve.py --report a.json b.json ... --json out.json     (merge the runs)

TPOT is only comparable between runs of equal output lengths: ``plain-matched`` gives each request as many
tokens (unconstrained) as it had in the schema run before it. Each request gets one of four bounded schemas
(enums, integer ranges, string and array bounds, no extra properties), greedy, max_tokens 64. vLLM runs with
xgrammar and ``disable_any_whitespace=True`` (its compact JSON, its best setting here: with whitespace allowed
SmolLM2 emitted newlines until max_tokens). Reported per run: output tokens/s, requests/s, TTFT and TPOT p50,
engine steps and forced tokens (chunkattn), and how many outputs parse and validate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"room": {"enum": ["single", "double", "suite"]},
                                      "nights": {"type": "integer", "minimum": 1, "maximum": 14},
                                      "guest": {"type": "string", "maxLength": 16}},
     "required": ["room", "nights", "guest"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]},
                                      "score": {"type": "integer", "minimum": 0, "maximum": 100},
                                      "topics": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                 "maxItems": 3}},
     "required": ["sentiment", "score", "topics"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                      "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"},
                                      "population_millions": {"type": "integer", "minimum": 0, "maximum": 40}},
     "required": ["city", "country_code", "population_millions"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"enum": ["low", "medium", "high"]},
                                      "reason": {"type": "string", "maxLength": 24}},
     "required": ["answer", "confidence", "reason"], "additionalProperties": False},
]


def workload(vocab_size: int, special: set[int], requests: int) -> Any:
    from chunkattn.bench.serve import ServeConfig, make_workload

    cfg = ServeConfig(requests=requests, shared_len=1024, question_len=64, output_len=64)
    return make_workload(cfg, vocab_size, special)


def summarize(side: str, mode: str, seconds: float, reqs: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    from chunkattn.bench.serve import _pct as pct  # (the serve benchmark's nearest-rank percentile)

    tokens = sum(r["tokens"] for r in reqs)
    valid = [_valid(r["text"], i) for i, r in enumerate(reqs)]
    tpot = [(r["finish"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in reqs if r["tokens"] > 1]
    return {"side": side, "mode": mode, "seconds": round(seconds, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / seconds, 1), "requests_per_s": round(len(reqs) / seconds, 3),
            "ttft_p50_ms": round(pct([(r["first"] - r["arrival"]) * 1e3 for r in reqs], 50), 1),
            "tpot_p50_ms": round(pct(tpot, 50), 2), "valid": sum(valid), "requests": len(reqs),
            "outputs": [[r["tokens"], r["text"][:100]] for r in reqs[:12]],
            "invalid": [r["text"][:200] for r, ok in zip(reqs, valid) if not ok][:4], **extra}


def _valid(text: str, i: int) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run_chunkattn(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from chunkattn import LLM, SamplingParams
    from chunkattn.engine.structured import StructuredOutputs

    llm = LLM(dtype=getattr(torch, args.dtype), kv_cache_tokens=65536, max_num_seqs=64)
    special = set(llm.tokenizer.all_special_ids or [])
    work = workload(int(llm.engine.model.config.vocab_size), special, args.requests)
    llm.generate(work.prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up, untimed
    llm.generate(work.prompts[0][:8], SamplingParams(max_tokens=4, structured=StructuredOutputs(json=SCHEMAS[0])))
    rows = []
    lengths: list[int] = []  # the last schema run's output lengths (for plain-matched)
    for mode in args.modes:
        plain = mode.startswith("plain")
        params = [SamplingParams(max_tokens=lengths[i] if mode == "plain-matched" else 64, temperature=0,
                                 ignore_eos=plain,
                                 structured=None if plain else StructuredOutputs(json=SCHEMAS[i % len(SCHEMAS)]))
                  for i in range(len(work.prompts))]
        llm.engine.config.jump_forward = mode != "schema-no-jump"
        llm.reset_prefix_cache()  # every mode starts cold, as the first did
        steps0, g = llm.engine.stats.steps, llm.engine.grammars.stats
        forced0, mask0, masks0 = g.forced_tokens, g.mask_seconds, g.mask_steps
        start = time.perf_counter()
        outs = llm.generate(work.prompts, params)
        seconds = time.perf_counter() - start
        if not plain:
            lengths = [len(o.token_ids) for o in outs]
        reqs = []
        for o in outs:
            times = o.outputs[0].token_times
            reqs.append({"arrival": start, "first": times[0], "finish": times[-1], "tokens": len(o.token_ids),
                         "text": o.text})
        rows.append(summarize("chunkattn", mode, seconds, reqs, {
            "steps": llm.engine.stats.steps - steps0, "forced_tokens": g.forced_tokens - forced0,
            "mask_ms_per_step": round((g.mask_seconds - mask0) / max(1, g.mask_steps - masks0) * 1e3, 3)}))
        print(rows[-1], flush=True)
    return rows


def run_vllm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from peer_vllm_serve import Driver
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    vocab = int(AutoConfig.from_pretrained(args.model, local_files_only=True).vocab_size)
    work = workload(vocab, set(tokenizer.all_special_ids or []), args.requests)
    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=True, seed=0,
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    driver = Driver(llm)
    llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], [SamplingParams(  # warm-up (xgrammar), untimed
        max_tokens=4, structured_outputs=StructuredOutputsParams(json=SCHEMAS[0]))], use_tqdm=False)
    rows = []
    lengths: list[int] = []
    for mode in [m for m in args.modes if m != "schema-no-jump"]:
        llm.reset_prefix_cache()  # every mode starts cold, as the first did
        plain = mode.startswith("plain")
        params = [SamplingParams(max_tokens=lengths[i] if mode == "plain-matched" else 64, temperature=0,
                                 ignore_eos=plain, output_kind=driver.delta, structured_outputs=None if plain else
                                 StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]))
                  for i in range(len(work.prompts))]
        run = driver.run(work.prompts, [0.0] * len(work.prompts), params)  # (all at once, as chunkattn's side)
        seconds = run["seconds"]
        reqs = [{**r, "tokens": len(r["tokens"]), "text": tokenizer.decode(r["tokens"], skip_special_tokens=True)}
                for r in run["requests"]]
        if not plain:
            lengths = [r["tokens"] for r in reqs]
        rows.append(summarize("vllm", mode, seconds, reqs, {}))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["chunkattn", "vllm"])
    ap.add_argument("--model", help="vLLM: the Hugging Face directory of SmolLM2 (peer_vllm_cpu.sh convert)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["plain", "schema", "schema-no-jump", "plain-matched"],
                    help="plain: 64 tokens, no schema; schema; schema-no-jump (chunkattn only); plain-matched: no "
                         "schema, each request as many tokens as in the schema run before it (TPOT on equal "
                         "lengths)")
    ap.add_argument("--report", nargs="+", help="merge these JSON files of runs into --json")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.report:
        runs = [row for path in args.report for row in json.loads(Path(path).read_text())["rows"]]
        result = {**json.loads(Path(args.report[0]).read_text()), "rows": runs}
    else:
        rows = run_chunkattn(args) if args.side == "chunkattn" else run_vllm(args)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        result = {"benchmark": "benchmarks/structured_serve.py", "date": time.strftime("%Y-%m-%d"), "cpu": cpu,
                  "amx_bf16": "amx_bf16" in flags, "cores": os.cpu_count(), "dtype": args.dtype,
                  "python": sys.version.split()[0], "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
