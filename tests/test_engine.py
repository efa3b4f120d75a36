"""The engine: greedy parity with transformers, sharing on == off, cache hits, preemption, n > 1, stops,
sampling, streaming. Small random-weight models for speed; SmolLM2 (the default model) for the real checks."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
import torch

from chunkattn import LLM, AsyncLLM, SamplingParams
from chunkattn.model import LoadedModel, load_model, to_transformers
from helpers import run_model, tiny_model

VOCAB = 101


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(VOCAB)


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(None)


def prompts_sharing(n: int, shared: int, own: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, VOCAB, (shared,), generator=g).tolist()
    return [prefix + torch.randint(0, VOCAB, (own + i,), generator=g).tolist() for i in range(n)]


def test_sharing_on_equals_off_and_hits_the_cache(tiny):
    prompts = prompts_sharing(6, shared=150, own=5)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    on = LLM(loaded=tiny, chunk_size=16, max_num_batched_tokens=64)
    off = LLM(loaded=tiny, chunk_size=16, max_num_batched_tokens=64, prefix_sharing=False)
    out_on, out_off = on.generate(prompts, greedy), off.generate(prompts, greedy)
    assert [o.token_ids for o in out_on] == [o.token_ids for o in out_off]
    assert all(len(o.token_ids) == 12 for o in out_on)
    # submitted together: the first prefills the shared prompt, the others wait for it and hit the cache
    assert all(o.metrics.num_cached_tokens >= 150 - 16 for o in out_on[1:])
    assert on.engine.stats.prefix_hit_rate >= 5 * 150 / sum(map(len, prompts)) - 1e-9  # all but the first
    assert off.engine.stats.prefix_hit_rate == 0
    assert on.engine.stats.peak_live_kv_bytes < off.engine.stats.peak_live_kv_bytes / 2


def test_greedy_matches_transformers_on_tiny_model(tiny):
    hf = to_transformers(tiny)
    prompts = prompts_sharing(3, shared=40, own=3, seed=5)
    outs = LLM(loaded=tiny, chunk_size=8).generate(prompts, SamplingParams(max_tokens=15, temperature=0))
    for p, o in zip(prompts, outs):
        x = torch.tensor([p])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=15, do_sample=False)[0, len(p):]
        assert o.token_ids == ref.tolist()


def test_preemption_recomputes_and_loses_nothing(tiny):
    prompts = prompts_sharing(8, shared=20, own=30, seed=3)
    greedy = SamplingParams(max_tokens=40, temperature=0)
    roomy = LLM(loaded=tiny, chunk_size=8).generate(prompts, greedy)
    tight_llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=8 * 24)
    tight = tight_llm.generate(prompts, greedy)
    assert tight_llm.engine.stats.preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    tight_llm.engine.cache.check()
    assert tight_llm.engine.cache.stats()["used_chunks"] == 0


def test_a_preempted_request_of_several_completions_without_prefix_sharing_resumes_in_its_own_room(tiny):
    """Without prefix sharing a preempted request of n completions computes its prompt once more and forks it. Its
    completions resumed one by one (each recomputing prompt + output, as with sharing on, where the cache shares
    the prompt) would hold n copies of the prompt: here more K/V than the pool has, so the request failed ("needs
    more K/V than the cache holds") though it had fit and runs alone. Found by test_engine_fuzz.py."""
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (49, 42))
    pa = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    pb = SamplingParams(max_tokens=40, n=2, temperature=0, ignore_eos=True)
    alone = [LLM(loaded=tiny, chunk_size=4, backend="reference").generate([p], sp)[0] for p, sp in ((a, pa), (b, pb))]
    for policy in ("fcfs", "cache-aware"):
        llm = LLM(loaded=tiny, chunk_size=4, kv_cache_tokens=144, prefix_sharing=False, scheduling_policy=policy,
                  backend="reference")
        outs = llm.generate([a, b], [pa, pb])
        assert llm.engine.stats.preemptions >= 1
        assert all(c.finish_reason == "length" for o in outs for c in o.outputs), [o.error for o in outs]
        assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in alone]
        llm.engine.cache.check()
        assert llm.engine.cache.stats()["used_chunks"] == 0


def test_admission_leaves_the_running_sequences_room_to_grow(tiny):
    """A prompt that fits the pool only by taking the chunk a running decode needs next waits: admitted, it was
    preempted (and recomputed) one step later. A's 8-token prompt fills 2 chunks of a 10-chunk pool; B's needs the
    other 8; A's first decode needs a third."""
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (8, 32))
    pa = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    pb = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    alone = [LLM(loaded=tiny, chunk_size=4).generate([p], sp)[0].token_ids for p, sp in ((a, pa), (b, pb))]
    for policy in ("fcfs", "cache-aware"):
        llm = LLM(loaded=tiny, chunk_size=4, kv_cache_tokens=40, scheduling_policy=policy)
        outs = llm.generate([a, b], [pa, pb])
        assert llm.engine.stats.preemptions == 0
        assert [o.token_ids for o in outs] == alone
        assert outs[1].metrics.first_scheduled_time >= outs[0].metrics.finish_time  # B waited for A


def test_n_completions_fork_the_prompt_and_are_seeded(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    params = SamplingParams(max_tokens=10, temperature=1.5, n=3, seed=7)
    a = llm.generate([list(range(30))], params)[0]
    b = llm.generate([list(range(30))], params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # seeded
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    assert a.metrics.num_output_tokens == 30
    assert b.metrics.num_cached_tokens == 29  # the second run reuses the first prompt from the cache


def test_admission_walks_the_tree_once_per_lookup_and_the_scheduler_owns_every_sequence(tiny):
    """Admission decides from one cache lookup per waiting request (room, deferral and the new sequence all
    use it: no other walk of the tree from a root), and after the run every sequence the scheduler added,
    forked or resumed is released: the cache holds no live sequence."""
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=1024, max_num_batched_tokens=96)
    cache, tree = llm.engine.cache, llm.engine.cache.tree
    walks = lookups = 0
    in_extend = False
    match, lookup, extend = tree.match, cache.lookup, cache.extend

    def counting_match(node, tokens):  # walks outside extend (which walks each sequence's new tokens)
        nonlocal walks
        walks += not in_extend
        return match(node, tokens)

    def counting_lookup(tokens, namespace=None, **kwargs):
        nonlocal lookups
        lookups += 1
        return lookup(tokens, namespace, **kwargs)

    def flagged_extend(seqs, tokens):
        nonlocal in_extend
        in_extend = True
        try:
            return extend(seqs, tokens)
        finally:
            in_extend = False

    tree.match, cache.lookup, cache.extend = counting_match, counting_lookup, flagged_extend
    prompts = prompts_sharing(6, shared=100, own=5, seed=3)
    params = [SamplingParams(max_tokens=12, temperature=1.0, n=1 + i % 3, seed=i) for i in range(6)]
    outs = llm.generate(prompts, params)
    assert all(len(c.token_ids) == 12 for o in outs for c in o.outputs)
    assert lookups >= 6 and walks == lookups
    assert cache.stats()["num_sequences"] == 0 and llm.engine.scheduler.running == []
    cache.check()


def _first_token_steps(llm: LLM, prompts: list[list[int]], params: SamplingParams, more=None):  # noqa: ANN001
    """Queue ``prompts`` at once, step the engine to the end; ``more``: (after step i, prompts) queued then.
    Returns (request ids, step index of each id's first token, each id's tokens)."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.num_unfinished:
        for o in engine.step():
            tokens[o.request_id] = o.token_ids
            if o.token_ids:
                first.setdefault(o.request_id, step)
        if more is not None and step == more[0]:
            ids += [engine.add_request(p, params) for p in more[1]]
        step += 1
    return ids, first, tokens


def test_cache_aware_admission_takes_cached_prompts_first_and_bounds_overtaking(tiny):
    """Requests whose prompt is mostly cached go ahead of an earlier one whose long prompt must be computed (they
    get their first token at once, the cold one later); "fcfs" keeps arrival order; both give every request the
    same greedy tokens. A request passed over max_overtakes times goes first from the next step."""
    g = torch.Generator().manual_seed(11)
    system = torch.randint(0, VOCAB, (48,), generator=g).tolist()

    def draw(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    warm, cold = system + draw(2), draw(60)
    hits = [system + draw(7) for _ in range(5)]  # 7 tokens each to compute: 5 fill a step's budget of 32
    later = [system + draw(7) for _ in range(4)]
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = {}
    for policy in ("cache-aware", "fcfs"):
        llm = LLM(loaded=tiny, chunk_size=8, max_num_batched_tokens=32, scheduling_policy=policy)
        llm.generate([warm], greedy)  # the system prompt is now cached
        ids, first, tokens = _first_token_steps(llm, [cold, *hits], greedy)
        runs[policy] = [tokens[i] for i in ids]
        if policy == "cache-aware":  # 4 x 7 + 4 tokens; then the fifth's 3 and the cold one's 29; its 31
            assert [first[i] for i in ids] == [2, 0, 0, 0, 0, 1]
            assert llm.engine.scheduler.waiting == deque()
        else:  # 32 of the cold prompt's 60; its 28 and 4 of the first hit's 7; ...
            assert first[ids[0]] == 1 and all(first[i] >= 1 for i in ids[1:])
        llm.engine.cache.check()
    assert runs["cache-aware"] == runs["fcfs"]

    # the cold request, overtaken 5 times in step 0: with max_overtakes=2 it takes step 1's budget ahead of the
    # hits queued after step 0 (first token at step 2, theirs at 3); with the default bound they go first
    for bound, cold_first, later_first in ((2, 2, 3), (64, 3, 1)):
        llm = LLM(loaded=tiny, chunk_size=8, max_num_batched_tokens=32, max_overtakes=bound)
        assert llm.engine.scheduler.config.max_overtakes == bound
        llm.generate([warm], greedy)
        ids, first, _ = _first_token_steps(llm, [cold, *hits], greedy, more=(0, later))
        assert first[ids[0]] == cold_first, (bound, first)
        assert [first[i] for i in ids[1:6]] == [0] * 4 + [1], (bound, first)
        assert min(first[i] for i in ids[6:]) == later_first, (bound, first)


def test_stop_token_ids_and_max_tokens(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    free = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0))[0]
    stop_at = free.token_ids[3]
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1] and out.outputs[0].finish_reason == "stop"
    assert free.outputs[0].finish_reason == "length"


def test_bad_requests_raise_clear_errors(tiny):
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="raise its size"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[VOCAB + 5]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_async_streaming_matches_offline(tiny):
    prompts = prompts_sharing(3, shared=30, own=4, seed=9)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    expected = [o.token_ids for o in LLM(loaded=tiny, chunk_size=8).generate(prompts, greedy)]
    alm = AsyncLLM(LLM(loaded=tiny, chunk_size=8))

    async def one(p):
        seen = []
        async for out in alm.generate(p, greedy):
            seen.append(len(out.token_ids))
        assert seen == sorted(seen) and out.finished
        return out.token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected


# ---------------------------------------------------------------------------- the real default model
def test_smollm2_greedy_matches_transformers_and_stop_strings(smol):
    hf = to_transformers(smol)
    llm = LLM(loaded=smol)
    convs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colors.")]
    prompts = [llm.apply_chat_template(c) for c in convs] + [llm.tokenizer("The quick brown fox")["input_ids"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    for p, o in zip(prompts, outs):
        x = torch.tensor([p])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        eos = smol.config.eos_token_ids
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert o.token_ids == ref[:cut]
    assert "Paris" in outs[0].text
    stopped = llm.generate([prompts[0]], SamplingParams(max_tokens=12, temperature=0, stop=["Paris"]))[0]
    assert "Paris" not in stopped.text and stopped.outputs[0].finish_reason == "stop"
    assert outs[0].text.startswith(stopped.text)


def test_cli_generate_streams(smol, monkeypatch, capsys):
    from chunkattn import cli

    monkeypatch.setattr(cli, "_load", lambda args: smol)
    assert cli.main(["generate", "What is the capital of France?", "--chat", "--max-tokens", "8"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_smollm2_logits_match_transformers(smol):
    """The real check of the decoder: SmolLM2's logits against transformers', prefill then decode steps."""
    from chunkattn import PrefixKVCache

    hf = to_transformers(smol)
    cfg = smol.config
    cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=16, max_tokens=1024,
                          dtype=torch.float32)
    prompt = smol.tokenizer("The tallest mountain in the world is")["input_ids"]
    seq = cache.add_sequence(prompt)
    tokens = list(prompt)
    new = prompt
    for _ in range(4):
        batch = cache.extend([seq], [new])
        pos = torch.arange(seq.num_tokens - len(new), seq.num_tokens)
        ours = run_model(smol.model, cache, batch, torch.tensor(new), pos)
        ref = hf(torch.tensor([tokens])).logits[0, -len(new):]
        assert float((ours - ref).norm() / ref.norm()) < 1e-4
        new = [int(ours[-1].argmax())]
        tokens += new
