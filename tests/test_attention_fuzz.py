"""Property-based: the native CPU kernels and the PyTorch TPP against the float64 reference on random prefix
trees.

Hypothesis grows a cache the way an engine does (groups of prompts that branch from a pool of system prompts, from
each other at any token, or from nothing; mixed steps where some sequences prefill and others decode; forks;
releases) and draws the shapes (chunk size, head size, K/V heads, GQA group, float32 or bfloat16, 1-3 threads)
and the planner's knobs (rows per task, shared pieces, decode splits), so the kernel's paths (shared tasks over
several levels of sharing, private tasks, wide decode tasks, split lists, partials merged, AMX tiles where the CPU
has them) meet in combinations that the parametrized tests in test_attention.py do not list. Every step's output
is checked row by row (each token and head) against the reference, LSE too: one wrong row among many would hide
in a whole-batch norm. Each run draws new examples (no fixed database seed).
"""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import chunkattn
from chunkattn import PrefixKVCache

CPU_TPP = importlib.import_module("chunkattn.attention.cpu_tpp")  # (the package's `attention` is the function)

pytestmark = pytest.mark.skipif(not CPU_TPP.kernels_available(), reason="the native CPU kernels did not build")

MAX_LIVE_TOKENS = 2500  # keeps the float64 reference quick
# per row (token x head): relative error of the output, absolute error of the LSE (natural log)
ROW_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}
PLANNER_KNOBS = ("ROWS_PER_TASK", "MIN_PIECE_TOKENS", "MIN_SPLIT_TOKENS", "TASKS_PER_THREAD")


def token_kv(tokens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random K/V rows that depend only on each token's prefix (a real model's do): ``[len, Hkv, d]`` each, so
    a row shared or stored wrongly reads different values."""
    h, ks, vs = 7, [], []
    for t in tokens:
        h = (h * 1000003 + t + 1) % 2147483647
        g = torch.Generator().manual_seed(h)
        ks.append(torch.randn(kv_heads, head_dim, generator=g))
        vs.append(torch.randn(kv_heads, head_dim, generator=g))
    return torch.stack(ks).to(dtype), torch.stack(vs).to(dtype)


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error of every [token, head] row (the floor keeps rows of tiny norm from dominating)."""
    out, ref = out.double(), ref.double()
    norms = ref.norm(dim=-1)
    return (out - ref).norm(dim=-1) / norms.clamp_min(1e-3 * float(norms.max().clamp_min(1e-30)))


class KernelMachine(RuleBasedStateMachine):
    @initialize(chunk_size=st.sampled_from([1, 3, 16, 64]), head_dim=st.sampled_from([16, 32, 64, 128]),
                kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 8]),
                dtype=st.sampled_from([torch.float32, torch.bfloat16]), threads=st.integers(1, 3),
                rows_per_task=st.sampled_from([8, 96]), min_piece=st.sampled_from([1, 64, 1024]),
                min_split=st.sampled_from([1, 32, 256]), tasks_per_thread=st.sampled_from([1, 8]),
                systems=st.lists(st.integers(0, 400), min_size=1, max_size=3), seed=st.integers(0, 2**31))
    def setup(self, chunk_size, head_dim, kv_heads, group, dtype, threads, rows_per_task, min_piece, min_split,
              tasks_per_thread, systems, seed):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.saved = (torch.get_num_threads(), {k: getattr(CPU_TPP, k) for k in PLANNER_KNOBS})
        torch.set_num_threads(threads)
        for k, v in zip(PLANNER_KNOBS, (rows_per_task, min_piece, min_split, tasks_per_thread)):
            setattr(CPU_TPP, k, v)
        self.cache = PrefixKVCache(1, kv_heads, head_dim, chunk_size=chunk_size, max_tokens=4 * MAX_LIVE_TOKENS,
                                   dtype=dtype)
        self.q_heads = kv_heads * group
        self.systems = [[self.rng.randrange(50) for _ in range(n)] for n in systems]  # shared system prompts

    def teardown(self):
        if not hasattr(self, "saved"):
            return
        threads, knobs = self.saved
        torch.set_num_threads(threads)
        for k, v in knobs.items():
            setattr(CPU_TPP, k, v)
        for seq in self.cache.sequences:
            self.cache.release(seq)

    def live_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.cache.sequences)

    def _extend(self, seqs, token_lists) -> None:
        cache = self.cache
        batch = cache.extend(seqs, token_lists)
        parts = [token_kv(list(s.token_ids), cache.num_kv_heads, cache.head_dim, cache.dtype) for s in batch.seqs]
        k = torch.cat([kv[0][len(kv[0]) - n :] for kv, n in zip(parts, batch.num_new)])
        v = torch.cat([kv[1][len(kv[1]) - n :] for kv, n in zip(parts, batch.num_new)])
        cache.store(0, batch, k, v)
        # sharper softmax in some steps: a few keys dominate, the running maximum moves between blocks
        scale = self.rng.choice([1.0, 1.0, 6.0])
        q = (torch.randn(batch.num_new_tokens, self.q_heads, cache.head_dim) * scale).to(cache.dtype)
        ref, ref_lse = chunkattn.attention(q, cache, batch, 0, backend="reference", return_lse=True)
        cached = [len(s.token_ids) - n for s, n in zip(batch.seqs, batch.num_new)]
        for backend in ("cpu", "torch"):  # the native kernels, and the vectorized PyTorch TPP
            out, lse = chunkattn.attention(q, cache, batch, 0, backend=backend, return_lse=True)
            assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2]
            assert not torch.isnan(out).any() and not torch.isnan(lse).any()
            out_tol, lse_tol = ROW_TOL[cache.dtype]
            err = row_errors(out, ref)
            worst = int(err.flatten().argmax())
            assert float(err.max()) <= out_tol, (
                f"{backend}: row (token {worst // self.q_heads}, head {worst % self.q_heads}) of "
                f"{batch.num_new_tokens} tokens: rel. error {float(err.max()):.3g} > {out_tol}; new tokens per "
                f"sequence {list(batch.num_new)}, cached {cached}")
            lse_err = float((lse.double() - ref_lse.double()).abs().max())
            assert lse_err <= lse_tol, f"{backend}: LSE error {lse_err:.3g} > {lse_tol}"
        for key, ws in cache.plan(batch).workspaces.items():  # which kinds of task ran (--hypothesis-show-statistics)
            if key.startswith("cpu:"):
                event(" ".join(kind for kind, n in (("shared", ws.num_shared_tasks), ("private", ws.num_private_tasks),
                                                    ("wide", ws.num_wide_tasks), ("fused", ws.num_fused_tasks),
                                                    ) if n) + f" {cache.dtype}")

    def full(self) -> bool:
        """At the size limit: the step releases the oldest sequence instead (rules stay enabled, so Hypothesis
        does not give up on drawing one)."""
        if self.live_tokens() < MAX_LIVE_TOKENS:
            return False
        self.cache.release(self.cache.sequences[0])
        return True

    @rule(n=st.integers(1, 5), data=st.data())
    def add_prompts(self, n, data):
        """n prompts in one prefill step: each a system prompt, a live sequence or nothing, cut anywhere (inside
        a chunk too), plus tokens of its own; prompts of one step may share what neither has cached yet."""
        if self.full():
            return
        live = [list(s.token_ids) for s in self.cache.sequences]
        prompts = []
        for _ in range(n):
            bases = self.systems + live + prompts + [[]]
            base = bases[data.draw(st.integers(0, len(bases) - 1), label="base")]
            cut = data.draw(st.integers(0, len(base)), label="cut")
            own = data.draw(st.integers(1, 80), label="own")
            prompts.append(base[:cut] + [self.rng.randrange(50) for _ in range(own)])
        seqs = [self.cache.add_sequence(p) for p in prompts]
        self._extend(seqs, [p[s.num_cached_tokens :] for s, p in zip(seqs, prompts)])

    @rule(data=st.data())
    def mixed_step(self, data):
        """Some sequences decode one token, others take several (a chunked prefill's next piece)."""
        if self.full() or not self.cache.sequences:
            return
        live = self.cache.sequences
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=8, unique_by=lambda s: s.seq_id))
        lengths = [data.draw(st.sampled_from([1, 1, 1, 2, 7, 33])) for _ in chosen]
        self._extend(chosen, [[self.rng.randrange(50) for _ in range(n)] for n in lengths])

    @rule(steps=st.integers(1, 3))
    def decode_all(self, steps):
        for _ in range(steps):
            if self.full() or not self.cache.sequences:
                return
            live = self.cache.sequences
            self._extend(live, [[self.rng.randrange(50)] for _ in live])

    @rule(data=st.data(), copies=st.integers(1, 3))
    def fork(self, data, copies):
        """Completions of one prompt (n > 1): forks share its tail chunk until they diverge."""
        if self.full() or not self.cache.sequences:
            return
        seq = data.draw(st.sampled_from(self.cache.sequences))
        for _ in range(copies):
            self.cache.fork(seq)

    @rule(data=st.data())
    def release(self, data):
        if self.cache.sequences:
            self.cache.release(data.draw(st.sampled_from(self.cache.sequences)))

    @invariant()
    def consistent(self):
        if hasattr(self, "cache"):
            self.cache.check()


# CHUNKATTN_FUZZ_EXAMPLES=2000 for a longer search than CI's
KernelMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "25")), stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestKernelMachine = KernelMachine.TestCase
