"""How close block-quantized weights run to today's dequantized paths, on the default model (SmolLM2-135M-Instruct,
its Q4_1 GGUF file): the same file loaded three ways (float32 dequantized, bfloat16 dequantized, bfloat16 with the
Q4_1 / Q8_0 blocks kept as stored), each sequence teacher-forced through prefill (many rows: the dequantized-panel
kernels) and decoded token by token (one row: the direct q4 kernel). Reports top-1 agreement with the float32 path
per position, the mean and the largest logit difference, the mean KL divergence of each position's next-token
distribution from float32's (in nats: small and stable where top-1 flips only at near-ties), and whether each
greedy continuation is the same.

    python benchmarks/quant_accuracy.py [--json out.json] [--tokens 48] [--model other.gguf]

``--model``: another GGUF file (a Q4_K_M one: its Q4_K / Q5_0 / Q6_K weights read into blocks with their values),
loaded the same three ways.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chunkattn import PrefixKVCache  # noqa: E402
from chunkattn.attention import get_backend  # noqa: E402
from chunkattn.model import load_model  # noqa: E402
from chunkattn.model.loader import weight_bytes  # noqa: E402

# hidden-style prompts: a system prompt and a user turn, through the chat template
SYSTEM = "You are a concise assistant for a travel agency. Answer in one or two sentences."
QUESTIONS = ["What is the capital of France?", "Which month is best to visit Japan for cherry blossoms?",
             "How long is a flight from London to New York?", "Name three things to pack for a beach trip.",
             "What currency is used in Switzerland?", "Is a visa needed for a US citizen visiting Mexico?",
             "Suggest a day trip from Rome.", "What language is spoken in Brazil?"]


def logits_of(model, cfg, tokens: list[int], prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits predicting tokens[prompt_len:]: in one prefill step (many rows), and as a prefill of
    the prompt followed by one decode step per token (one row)."""
    out = []
    for feed in ([tokens[:-1]], [tokens[:prompt_len]] + [[t] for t in tokens[prompt_len:-1]]):
        cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=64, max_tokens=4096,
                              dtype=model.lm_head.weight.dtype, retain_prefixes=False, share_prefixes=False)
        seq = cache.add_sequence(feed[0])
        rows, pos0 = [], 0
        for chunk in feed:
            batch = cache.extend([seq], [chunk])
            attn = get_backend("auto", cache)
            attn.plan(batch)
            rows.append(model(torch.tensor(chunk), torch.arange(pos0, pos0 + len(chunk)), attn).float())
            pos0 += len(chunk)
        out.append(torch.cat(rows)[prompt_len - 1:])
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json")
    ap.add_argument("--model", help="a GGUF file (default: the default model's Q4_1 file)")
    args = ap.parse_args()
    kept = "bfloat16 Q4_1 as stored" if args.model is None else "bfloat16 quantized as read"
    variants = {"float32 dequantized": (torch.float32, "none"), "bfloat16 dequantized": (torch.bfloat16, "none"),
                kept: (torch.bfloat16, "gguf")}
    loaded = {name: load_model(args.model, dtype=dt, quantization=q) for name, (dt, q) in variants.items()}
    ref = loaded["float32 dequantized"]
    tok = ref.tokenizer
    from chunkattn.engine.llm import LLM
    from chunkattn.engine.sampling import SamplingParams

    llm = LLM(loaded=ref)
    prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0))
    seqs = [p + list(o.token_ids) for p, o in zip(prompts, outs)]
    try:  # (-dirty: the tree held changes the commit does not)
        commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "tokens": args.tokens,
              "commit": commit,
              "prompts": len(prompts), "variants": {}, **({"model": args.model} if args.model else {})}
    ref_logits = [logits_of(ref.model, ref.config, s, len(p)) for s, p in zip(seqs, prompts)]
    greedy: dict[str, list[list[int]]] = {}
    for name, lm in loaded.items():
        agree = {"prefill": 0, "decode": 0}
        worst = {"prefill": 0.0, "decode": 0.0}
        mean_abs = {"prefill": 0.0, "decode": 0.0}
        kl = {"prefill": 0.0, "decode": 0.0}
        total = 0
        for s, p, (rp, rd) in zip(seqs, prompts, ref_logits):
            lp, ld = logits_of(lm.model, lm.config, s, len(p))
            total += len(rp)
            for key, a, b in (("prefill", lp, rp), ("decode", ld, rd)):
                agree[key] += int((a.argmax(-1) == b.argmax(-1)).sum())
                diff = (a.double() - b.double()).abs()
                worst[key] = max(worst[key], float(diff.max()))
                mean_abs[key] += float(diff.mean(-1).sum())
                ref_log = torch.log_softmax(b.double(), -1)  # KL(float32 || this variant), summed over positions
                kl[key] += float((ref_log.exp() * (ref_log - torch.log_softmax(a.double(), -1))).sum())
        gen = LLM(loaded=lm).generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0))
        greedy[name] = [list(g.token_ids) for g in gen]
        same = sum(g == list(o.token_ids) for g, o in zip(greedy[name], outs))
        bf16 = greedy.get("bfloat16 dequantized", greedy[name])
        same_bf16 = sum(a == b for a, b in zip(greedy[name], bf16))
        result["variants"][name] = {
            "top1_agreement_prefill": agree["prefill"] / total, "top1_agreement_decode": agree["decode"] / total,
            "max_abs_logit_diff_prefill": worst["prefill"], "max_abs_logit_diff_decode": worst["decode"],
            "mean_abs_logit_diff_prefill": mean_abs["prefill"] / total,
            "mean_abs_logit_diff_decode": mean_abs["decode"] / total,
            "mean_kl_prefill": kl["prefill"] / total, "mean_kl_decode": kl["decode"] / total,
            "greedy_sequences_equal": f"{same}/{len(prompts)}",
            "greedy_sequences_equal_to_bf16_dequantized": f"{same_bf16}/{len(prompts)}",
            "weight_mib": round(weight_bytes(lm.model)["total"] / 2**20, 1)}
        print(name, json.dumps(result["variants"][name]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
