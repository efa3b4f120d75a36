"""One request at a time, as `llama-bench` measures it: prompt processing of --prompt tokens (tokens/s of the
prefill step) and text generation of --gen tokens (tokens/s of the decode steps), each the median of --repeats.

    python benchmarks/single_stream.py [--model path.gguf] [--dtype bfloat16] [--quantization auto] [--prompt 512]
        [--gen 128] [--json OUT]

Random prompt ids below the vocabulary, no prefix shared between repeats (each repeat's prompt is new), greedy
decoding that ignores end-of-sequence, like llama-bench's pp512 / tg128.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from chunkattn.engine.llm import LLM
from chunkattn.engine.sampling import SamplingParams
from chunkattn.model import load_model
from chunkattn.system import info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path (default: the bundled SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random-weights", action="store_true", help="--model is a config.json: random weights")
    ap.add_argument("--quantization", default="auto", help="see `chunkattn serve --help` (auto: a GGUF file's "
                    "quantized blocks kept as stored in bfloat16; none: dequantized at load)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), quantization=args.quantization,
                        random_weights=args.random_weights)
    llm = LLM(loaded=loaded, kv_cache_tokens=4 * (args.prompt + args.gen + 64), max_num_batched_tokens=args.prompt)
    rng = random.Random(0)
    special = set(getattr(loaded.tokenizer, "all_special_ids", []) or []) if loaded.tokenizer is not None else set()
    vocab = [t for t in range(loaded.config.vocab_size) if t not in special]
    engine = llm.engine
    llm.generate([rng.choice(vocab) for _ in range(16)], SamplingParams(max_tokens=4))  # warm-up
    pp, tg = [], []
    for _ in range(args.repeats):
        prompt = [rng.choice(vocab) for _ in range(args.prompt)]
        engine.add_request(prompt, SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()  # the whole prompt in one step, and the first token
        t1 = time.perf_counter()
        steps, last = 0, []
        while engine.num_unfinished:
            last = engine.step() or last
            steps += 1
        t2 = time.perf_counter()
        pp.append(args.prompt / (t1 - t0))
        tg.append(steps / (t2 - t1))
    quantized = sorted({m.quant.qtype for m in loaded.model.modules() if getattr(m, "quant", None) is not None})
    result = {"system": "chunkattn", "model": loaded.source, "dtype": args.dtype,
              "quantization": "/".join(quantized) or "none", "prompt": args.prompt,
              "gen": args.gen, "pp_tokens_per_s": round(statistics.median(pp), 1),
              "tg_tokens_per_s": round(statistics.median(tg), 1), "date": time.strftime("%Y-%m-%d"),
              # the last repeat's greedy tokens: two builds that compute the same products generate the same ones
              "last_token_ids": list(last[-1].outputs[0].token_ids) if last else [],
              "system_info": info()}
    print(f"chunkattn {args.dtype} {result['quantization']}: pp{args.prompt} {result['pp_tokens_per_s']} tok/s, "
          f"tg{args.gen} {result['tg_tokens_per_s']} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
