"""``chunkattn demo``: a batch of chat requests that share a long system prompt, run with prefix sharing
on and off on the same weights; prints answers, speed and K/V memory of both."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from chunkattn.engine import LLM, SamplingParams
from chunkattn.engine.args import SERVING_KV_CACHE_TOKENS, EngineArgs
from chunkattn.model.loader import LoadedModel

#: The demo's engine options where they differ from EngineArgs' (``chunkattn demo`` has these defaults too).
DEMO_DEFAULTS: dict[str, Any] = {"kv_cache_tokens": SERVING_KV_CACHE_TOKENS}

_TOPICS = ["refunds", "shipping", "warranties", "accounts", "passwords", "invoices", "discounts", "returns",
           "gift cards", "subscriptions", "privacy", "deliveries", "repairs", "exchanges", "loyalty points"]
_ACTIONS = ["answer politely and briefly", "ask for the order number first", "never promise dates you cannot keep",
            "offer to escalate to a human agent", "summarise the policy in one sentence",
            "point to the help centre article"]

QUESTIONS = [
    "How do I get a refund for a broken kettle?", "When will my parcel arrive?", "Can I change my password?",
    "Do you ship to Canada?", "My gift card does not work, what now?", "How do loyalty points work?",
    "Can I cancel my subscription?", "Is my warranty still valid after two years?", "Where is my invoice?",
    "Can I exchange shoes for a bigger size?", "How do you use my personal data?", "Do you repair laptops?",
]


def system_prompt() -> str:
    """A long (about 800-token) support-desk policy shared by every request."""
    lines = ["You are Ada, the support assistant of the Northwind online shop. Follow these rules."]
    for i, topic in enumerate(_TOPICS[:8]):
        for j, action in enumerate(_ACTIONS[:4]):
            lines.append(f"Rule {4 * i + j + 1}: for questions about {topic}, {_ACTIONS[(i + j) % len(_ACTIONS)]}; "
                         f"also {action}.")
    return "\n".join(lines)


def run_demo(loaded: LoadedModel, num_requests: int = 8, max_tokens: int = 32,
             engine: EngineArgs | None = None) -> None:
    """``engine``: the engine options (default: :data:`DEMO_DEFAULTS`); it runs with sharing on, then off."""
    engine = engine if engine is not None else EngineArgs(**DEMO_DEFAULTS)
    system = system_prompt()
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
             for i in range(num_requests)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    results = {}
    for sharing in (True, False):
        llm = LLM.from_args(dataclasses.replace(engine, prefix_sharing=sharing), loaded=loaded)
        prompts = [llm.apply_chat_template(c) for c in convs]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        results[sharing] = (outs, seconds, llm.engine.stats)
        if sharing:
            print(f"{num_requests} requests, system prompt of {len(prompts[0]) - 20}+ tokens shared by all\n")
            for c, o in zip(convs, outs):
                print(f"Q: {c[1]['content']}\nA: {o.text.strip()}\n")
    print("| prefix sharing | wall s | prompt tokens computed | decode tok/s | peak KV MiB | prefix hit |")
    print("|---|---|---|---|---|---|")
    for sharing, (_, seconds, st) in results.items():
        computed = st.prompt_tokens - st.cached_prompt_tokens
        print(f"| {'on' if sharing else 'off'} | {seconds:.1f} | {computed} | {st.decode_tokens_per_s:.1f} | "
              f"{st.peak_live_kv_bytes / 2**20:.1f} | {st.prefix_hit_rate:.0%} |")
    same = [a.token_ids for a in results[True][0]] == [b.token_ids for b in results[False][0]]
    print(f"\nidentical greedy outputs with and without sharing: {'yes' if same else 'NO'}")
