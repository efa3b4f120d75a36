"""Property-based: the engine's scheduling, prefix cache and request lifecycle under random traffic.

Hypothesis draws an engine (chunk size, a K/V pool from tight to roomy, prefill budget, running-sequence limit,
admission policy and its overtaking bound, prefix sharing on or off) and drives it step by step with requests that
branch from shared system prompts or from each other at any token (n = 1 or 2 completions, greedy or seeded
sampling; a stop token, logprobs, the prompt's logprobs or a tenant's cache salt sometimes), aborts in any state,
and steps in between; so admission order, waiting for a prompt being prefilled, chunked prefill, preemption and
recomputation, forks and aborts meet in orders no hand-written test lists.

After every step the cache is consistent; at the end every request has finished (nothing starves or hangs), the
pool holds no live K/V, and every request that was not aborted produced exactly the greedy tokens the same
request produces alone on a roomy engine. The model is batch-invariant here (float32 linears on AVX-512 panels
compute each row alone; the float64 reference attention computes each sequence alone), so that comparison is
exact: a wrong K/V row, a mis-shared prefix or a lost token changes the tokens. A third of the engines run the
native attention kernels and layer loop instead: the same invariants, token counts instead of tokens.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chunkattn import LLM, SamplingParams, native
from chunkattn.engine.scheduler import SCHEDULING_POLICIES
from helpers import tiny_model

pytestmark = pytest.mark.skipif(not native.linear_supported(), reason="the exact comparison needs the float32 "
                                "panels (AVX-512), whose rows do not depend on the batch")

VOCAB, EOS = 101, 100
TINY = tiny_model(VOCAB, eos=EOS)
_SOLO: dict[tuple, tuple] = {}  # (prompt, params) -> each completion's tokens and the prompt logprobs, alone


def result(out) -> tuple:
    """What the comparison covers: each completion's tokens, the prompt's logprobs and the sampled tokens'
    logprobs (with their top alternatives) when asked for."""
    prompt_lp = None if out.prompt_logprobs is None else [
        None if e is None else (e.token_id, e.logprob) for e in out.prompt_logprobs]
    completions = sorted(out.outputs, key=lambda c: c.index)
    lps = [None if c.logprobs is None else [(e.token_id, e.logprob, e.top) for e in c.logprobs] for c in completions]
    return [c.token_ids for c in completions], prompt_lp, lps


def solo(prompt: list[int], params: SamplingParams) -> tuple:
    """The request alone on a roomy engine (memoized across examples)."""
    key = (tuple(prompt), repr(params))
    if key not in _SOLO:
        llm = LLM(loaded=TINY, chunk_size=16, backend="reference")
        [out] = llm.generate([prompt], params)
        _SOLO[key] = result(out)
    return _SOLO[key]


class EngineMachine(RuleBasedStateMachine):
    @initialize(chunk_size=st.sampled_from([1, 4, 8, 16]), kv_chunks=st.sampled_from([0, 0, 12, 80]),
                budget=st.sampled_from([4, 16, 64, 2048]), max_seqs=st.sampled_from([1, 2, 5, 64]),
                policy=st.sampled_from(sorted(SCHEDULING_POLICIES)), max_overtakes=st.sampled_from([0, 1, 64]),
                sharing=st.sampled_from([True, True, False]), exact=st.sampled_from([True, True, False]),
                seed=st.integers(0, 2**31))
    def setup(self, chunk_size, kv_chunks, budget, max_seqs, policy, max_overtakes, sharing, exact, seed):
        self.rng = random.Random(seed)
        # every request below fits the pool alone (a prompt of at most 60 tokens and 40 outputs, two completions);
        # kv_chunks 0: no more than that, so that a few requests at once preempt one another
        kv_tokens = max(kv_chunks * chunk_size, (60 + 2 * 40) + 4 * chunk_size)
        self.llm = LLM(loaded=TINY, chunk_size=chunk_size, kv_cache_tokens=kv_tokens, max_num_batched_tokens=budget,
                       max_num_seqs=max_seqs, scheduling_policy=policy, max_overtakes=max_overtakes,
                       prefix_sharing=sharing, backend="reference" if exact else "cpu")
        self.exact = exact  # else the native kernels: every invariant but the tokens' exact equality
        self.engine = self.llm.engine
        self.systems = [[self.rng.randrange(EOS) for _ in range(self.rng.randrange(1, 45))] for _ in range(2)]
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: set[str] = set()
        self.final: dict[str, object] = {}

    def _collect(self, outputs) -> None:
        for out in outputs:
            if out.finished:
                assert out.request_id not in self.final, f"{out.request_id} finished twice"
                self.final[out.request_id] = out

    @rule(count=st.integers(1, 3), data=st.data())
    def add(self, count, data):
        """Requests that reach the same step: each a system prompt, an earlier prompt or nothing, cut anywhere,
        plus its own tokens."""
        earlier = [p for p, _ in self.requests.values()]
        batch = []
        for _ in range(count):
            bases = self.systems + earlier + [[]]
            base = bases[data.draw(st.integers(0, len(bases) - 1), label="base")]
            cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))), label="cut")
            prompt = (base[:cut] + [self.rng.randrange(EOS) for _ in range(data.draw(st.integers(1, 20)))])[:60]
            stop = [self.rng.randrange(EOS)] if data.draw(st.booleans(), label="stop token") else []
            # greedy, or sampled with a seed (the same tokens alone or in a crowd); the prompt's logprobs (every
            # prompt token computed again) sometimes; a tenant's cache salt sometimes
            sampled = data.draw(st.sampled_from([False, False, True]), label="sampled")
            seed = self.rng.randrange(1000) if sampled else None
            params = SamplingParams(max_tokens=data.draw(st.sampled_from([1, 3, 12, 40])),
                                    temperature=1.0 if sampled else 0, seed=seed,
                                    n=data.draw(st.sampled_from([1, 1, 2])), stop_token_ids=stop,
                                    prompt_logprobs=data.draw(st.sampled_from([None, None, None, 0]), label="plp"),
                                    logprobs=data.draw(st.sampled_from([None, None, 0, 2]), label="logprobs"))
            salt = data.draw(st.sampled_from([None, None, "tenant"]), label="salt")
            batch.append((prompt, params, salt))
        requests = [self.engine.make_request(p, sp, cache_salt=salt) for p, sp, salt in batch]
        for rid, (prompt, params, _) in zip(self.engine.enqueue(requests), batch):
            self.requests[rid] = (prompt, params)

    @rule(steps=st.integers(1, 6))
    def step(self, steps):
        for _ in range(steps):
            self._collect(self.engine.step())

    @rule(data=st.data())
    def abort(self, data):
        live = [rid for rid in self.requests if rid not in self.final and rid not in self.aborted]
        if live:
            rid = data.draw(st.sampled_from(live))
            self.engine.abort(rid)
            self.aborted.add(rid)

    @invariant()
    def consistent(self):
        if hasattr(self, "engine"):
            self.engine.cache.check()

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        engine = self.engine
        for _ in range(3000):  # every request ends: nothing starves or deadlocks
            if not engine.num_unfinished:
                break
            self._collect(engine.step())
        assert engine.num_unfinished == 0, "requests left unfinished after 3000 steps"
        assert set(self.final) == set(self.requests)
        engine.cache.check()
        stats = engine.cache.stats()
        assert stats["used_chunks"] == 0 and stats["num_sequences"] == 0, stats
        event(f"preempted: {engine.stats.preemptions > 0}")  # (what ran: --hypothesis-show-statistics)
        event(f"prefix hits: {engine.stats.prefix_hit_rate > 0}")
        event(f"aborts: {bool(self.aborted)}")
        for rid, (prompt, params) in self.requests.items():
            out = self.final[rid]
            reasons = {c.finish_reason for c in out.outputs}
            if rid in self.aborted:
                assert reasons <= {"abort", "length", "stop"}, reasons
                continue
            assert reasons <= {"length", "stop"}, (rid, reasons, out.error)
            got = result(out)
            if self.exact:
                assert got == solo(prompt, params), f"{rid}: prompt {prompt}, {params}"
            else:  # (the kernels' sums may flip a near tie)
                assert all(1 <= len(t) <= params.max_tokens for t in got[0]), (rid, got)
            assert (got[1] is None) == (params.prompt_logprobs is None) and (got[1] is None or len(got[1]) == len(
                prompt)), (rid, got[1])
            for tokens, lps in zip(got[0], got[2]):  # a logprob for every token, with the alternatives asked for
                assert (lps is None) == (params.logprobs is None) and (
                    lps is None or ([e[0] for e in lps] == tokens and all(len(e[2]) == params.logprobs for e in lps)))


EngineMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "20")), stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestEngineMachine = EngineMachine.TestCase
