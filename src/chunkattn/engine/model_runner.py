"""``ModelRunner``: between the scheduler and the model. Builds a step's input tensors, plans attention once,
runs the model, samples every completion in one batched pass and computes the logprobs asked for."""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from chunkattn.attention.backend import get_backend
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.engine.request import Completion, Request, TokenLogprob
from chunkattn.engine.sampler import Sampler, SamplingMetadata, prompt_logprobs
from chunkattn.engine.scheduler import SchedulerOutput
from chunkattn.engine.structured import GrammarCompiler, apply_masks, fill_masks
from chunkattn.model.llama import LlamaForCausalLM


class Sample(NamedTuple):
    """One sampled token of one completion."""

    request: Request
    completion: Completion
    token: int
    logprob: TokenLogprob | None  # when the request asked for logprobs


class PromptLogprobs(NamedTuple):
    """The logprobs of prompt tokens ``first .. first + len(entries) - 1`` of one request, computed this step."""

    request: Request
    first: int
    entries: list[TokenLogprob]


@dataclass
class RunnerOutput:
    """What one step produced: ``samples`` in the order of the scheduled units, ``prompt_logprobs`` per request
    that asked for them."""

    samples: list[Sample] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


def new_seed() -> int:
    """A random 63-bit seed for a completion that has none."""
    return random.getrandbits(63)


class ModelRunner:
    """Runs scheduled steps of ``model`` on ``cache`` with the attention backend ``backend``."""

    def __init__(self, model: LlamaForCausalLM, cache: PrefixKVCache, backend: str = "auto",
                 eos_token_ids: tuple[int, ...] = (), grammars: GrammarCompiler | None = None):
        self.model = model
        self.grammars = grammars
        self._mask_pool: ThreadPoolExecutor | None = None
        self.cache = cache
        self.attn = get_backend(backend, cache)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run one scheduled step: inputs, attention plan, model, sampling, logprobs."""
        assert step.batch is not None
        dev = self.cache.device
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sample_rows: list[int] = []  # index into logit_rows of each sampled completion
        sampled: list[tuple[Request, Completion]] = []
        prompt_rows: list[tuple[Request, int, int, list[int]]] = []  # request, first logit row, first prompt idx, next
        for u in step.units:
            row0 = len(ids)
            ids.extend(u.tokens)
            positions.extend(range(u.first_pos, u.first_pos + len(u.tokens)))
            r = u.request
            if r.params.prompt_logprobs is not None and u.completion is None:
                # row i predicts prompt token first_pos + i + 1 (the last row, the first output token)
                nxt = list(r.prompt_ids[u.first_pos + 1 : u.first_pos + 1 + len(u.tokens)])
                if nxt:
                    prompt_rows.append((r, len(logit_rows), u.first_pos + 1, nxt))
                    logit_rows.extend(range(row0, row0 + len(nxt)))
            if u.samples:
                targets = r.live_completions if u.completion is None else [u.completion]
                logit_rows.append(len(ids) - 1)  # never a prompt-logprob row: it predicts an output token
                for c in targets:
                    sample_rows.append(len(logit_rows) - 1)
                    sampled.append((r, c))
        masks = self._start_masks(sampled)
        self.attn.plan(step.batch)
        logits = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.attn,
                            torch.tensor(logit_rows, dtype=torch.int64, device=dev))  # [len(logit_rows), V]
        out = RunnerOutput()
        if sampled:
            out.samples = self._sample(logits, sample_rows, sampled, masks)
        for r, row, first, nxt in prompt_rows:
            k = r.params.prompt_logprobs or 0
            chosen, top_lp, top_ids = prompt_logprobs(logits[row : row + len(nxt)],
                                                      torch.tensor(nxt, device=logits.device), k)
            out.prompt_logprobs.append(PromptLogprobs(r, first, _entries(nxt, chosen, top_ids, top_lp, k)))
        return out

    def _start_masks(self, sampled: list[tuple[Request, Completion]]) -> Future[tuple[torch.Tensor, float]] | None:
        """The allowed-token bitmask of the structured rows, computed on a worker thread while the model runs
        (llguidance drops the GIL); None when no row is structured."""
        constrained = [(c.grammar, i) for i, (_, c) in enumerate(sampled) if c.grammar is not None]
        if not constrained or self.grammars is None:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="chunkattn-masks")
        grammars, rows = self.grammars, len(sampled)

        def fill() -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            return fill_masks(grammars, constrained, rows), time.perf_counter() - start

        return self._mask_pool.submit(fill)

    def _sample(self, logits: torch.Tensor, sample_rows: list[int], sampled: list[tuple[Request, Completion]],
                masks: Future[tuple[torch.Tensor, float]] | None = None) -> list[Sample]:
        rows = logits if sample_rows == list(range(logits.shape[0])) else \
            logits.index_select(0, torch.tensor(sample_rows, device=logits.device))  # [R, V]
        raw = rows
        if masks is not None:
            assert self.grammars is not None
            start = time.perf_counter()
            bitmask, fill_seconds = masks.result()
            structured = [i for i, (_, c) in enumerate(sampled) if c.grammar is not None]
            logprobs = any(r.params.logprobs is not None for r, _ in sampled)
            rows = apply_masks(rows, bitmask, structured, inplace=not logprobs)  # (raw kept for logprobs)
            stats = self.grammars.stats
            stats.mask_seconds += fill_seconds + time.perf_counter() - start
            stats.mask_steps += 1
        params = [r.params for r, _ in sampled]
        penalties = any(p.uses_penalties for p in params)
        meta = SamplingMetadata.from_rows(
            params,
            seeds=[c.seed for _, c in sampled],
            counters=[len(c.token_ids) for _, c in sampled],
            output_ids=[c.token_ids for _, c in sampled] if penalties else [],
            prompt_ids=[list(r.prompt_ids) for r, _ in sampled] if penalties else [],
            blocked=[self._blocked(r, c) for r, c in sampled],
            vocab_size=self.vocab_size, device=logits.device)
        result = self.sampler(rows, meta, raw)
        tokens = result.token_ids.tolist()
        entries: list[TokenLogprob | None] = [None] * len(tokens)
        if result.logprobs is not None:
            lp = result.logprobs.tolist()
            top_ids = result.top_ids.tolist() if result.top_ids is not None else None
            top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            for i, (r, _) in enumerate(sampled):
                want = r.params.logprobs
                if want is None:
                    continue
                top = () if not want or top_ids is None or top_lp is None else \
                    tuple(zip(top_ids[i][:want], top_lp[i][:want]))
                entries[i] = TokenLogprob(tokens[i], lp[i], top)
        return [Sample(r, c, t, e) for (r, c), t, e in zip(sampled, tokens, entries)]

    def _blocked(self, r: Request, c: Completion) -> list[int]:
        """Tokens that may not be sampled yet: end-of-sequence and stop tokens before ``min_tokens`` (not for a
        structured completion: its grammar says when it may end)."""
        p = r.params
        if len(c.token_ids) >= p.min_tokens or c.grammar is not None:
            return []
        return [*(() if p.ignore_eos else self.eos_token_ids), *p.stop_token_ids]


def _entries(ids: list[int], chosen: torch.Tensor, top_ids: torch.Tensor | None, top_lp: torch.Tensor | None,
             k: int) -> list[TokenLogprob]:
    lp = chosen.tolist()
    if top_ids is None or top_lp is None or not k:
        return [TokenLogprob(t, v) for t, v in zip(ids, lp)]
    ti, tl = top_ids.tolist(), top_lp.tolist()
    return [TokenLogprob(t, v, tuple(zip(ti[i], tl[i]))) for i, (t, v) in enumerate(zip(ids, lp))]
