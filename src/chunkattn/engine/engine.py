"""``LLMEngine``: runs the scheduler's steps through the model on the prefix cache and samples tokens."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chunkattn.attention import BACKENDS, Backend
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.engine.request import Completion, Request, RequestOutput, RequestState
from chunkattn.engine.sampling import SamplingParams, sample_token
from chunkattn.engine.scheduler import ScheduledUnit, Scheduler, SchedulerConfig
from chunkattn.errors import CacheFullError, ChunkAttnError
from chunkattn.model.llama import LlamaForCausalLM


class EngineError(ChunkAttnError, RuntimeError):
    """The engine cannot go on (a bug, or a request that cannot fit even alone)."""


@dataclass
class EngineStats:
    """Counters since the engine started (or ``reset``)."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    cached_prompt_tokens: int = 0  # of which found in the prefix cache
    computed_tokens: int = 0  # tokens run through the model (prefill + decode + recompute)
    output_tokens: int = 0
    decode_steps: int = 0  # steps that computed no prefill token
    decode_step_tokens: int = 0
    decode_step_time: float = 0.0
    preemptions: int = 0
    peak_live_kv_bytes: int = 0  # K/V bytes of chunks referenced by running sequences (retained ones excluded)
    busy_time: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_step_tokens / self.decode_step_time if self.decode_step_time else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["prefix_hit_rate"] = self.prefix_hit_rate
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


class LLMEngine:
    """Continuous batching over a :class:`PrefixKVCache`. ``add_request`` and ``step`` are thread-safe."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Any, cache: PrefixKVCache,
                 config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(cache, self.config.scheduler)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._eos = set(model.config.eos_token_ids)
        mc = model.config
        if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (mc.num_layers, mc.num_kv_heads, mc.head_dim):
            raise ValueError("the cache's layers / kv heads / head_dim do not match the model's")

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return prompt, list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return None, [int(t) for t in prompt]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Request:
        """Queue a prompt (text or token ids). Raises ``ValueError`` if it can never fit in the cache."""
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        c = self.cache.chunk_size
        worst = -(-len(ids) // c) + params.n * (-(-params.max_tokens // c) + 1)
        if worst > self.cache.num_slots:
            raise ValueError(f"a prompt of {len(ids)} tokens with n={params.n}, max_tokens={params.max_tokens} "
                             f"needs up to {worst} chunks; the cache has {self.cache.num_slots}: raise its size")
        completions = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator()
                gen.manual_seed(params.seed + i if params.seed is not None else int(torch.randint(2**62, ())))
            completions.append(Completion(i, gen))
        request = Request(request_id or f"req-{next(self._ids)}", text, ids, params, completions)
        with self._lock:
            self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model once, sample. Returns the requests that advanced."""
        with self._lock:
            return self._step()

    def _extend(self, units: list[ScheduledUnit]) -> tuple[list[ScheduledUnit], Any]:
        """Room for every unit's tokens; preempts the newest requests while the pool is short."""
        while units:
            try:
                return units, self.cache.extend([u.seq for u in units], [u.tokens for u in units])
            except CacheFullError:
                oldest = self.scheduler.running[0] if self.scheduler.running else None
                victim = self.scheduler.preempt_newest(keep=oldest)
                if victim is None:
                    raise EngineError("the oldest request does not fit in the cache on its own") from None
                self.stats.preemptions += 1
                units = [u for u in units if u.request is not victim]
        return units, None

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        units, batch = self._extend(self.scheduler.schedule())
        if batch is None:
            return []
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        for u in units:
            end = u.seq.num_tokens
            ids.extend(u.tokens)
            positions.extend(range(end - len(u.tokens), end))
            if u.samples:
                logit_rows.append(len(ids) - 1)
        dev = self.cache.device
        logits = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.cache, batch,
                            torch.tensor(logit_rows, dtype=torch.int64, device=dev), backend=self.config.backend)
        logits = logits.cpu()
        now = time.perf_counter()
        touched: dict[int, Request] = {}
        row = 0
        for u in units:
            touched[id(u.request)] = u.request
            if u.samples:
                self._sample(u, logits[row], now)
                row += 1
        self._account(units, len(ids), now - t0)
        outputs = []
        for r in touched.values():
            if not r.finished and all(c.finished for c in r.completions):
                r.finish_time = now
                self.scheduler.finish(r)
            outputs.append(RequestOutput.of(r))
        return outputs

    def _sample(self, u: ScheduledUnit, logits: torch.Tensor, now: float) -> None:
        r = u.request
        if u.completion is None:  # the prompt is done: every completion starts from it
            assert r.prompt_seq is not None
            for i, c in enumerate(r.completions):
                c.seq = r.prompt_seq if i == 0 else self.cache.fork(r.prompt_seq)
            r.prompt_seq = None
            r.forked = True
            targets = r.completions
        else:
            targets = [u.completion]
        if r.first_token_time is None:
            r.first_token_time = now
        for c in targets:
            token = sample_token(logits, r.params, c.generator)
            c.token_ids.append(token)
            self.stats.output_tokens += 1
            self._check_stop(r, c, token)
            if c.finished and c.seq is not None:
                self.cache.release(c.seq)
                c.seq = None

    def _check_stop(self, r: Request, c: Completion, token: int) -> None:
        p = r.params
        if self.tokenizer is not None:
            c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if (token in self._eos and not p.ignore_eos) or token in p.stop_token_ids:
            c.finish_reason = "stop"
            return
        for s in p.stop:
            at = c.text.find(s)
            if at >= 0:
                c.text = c.text[:at]
                c.finish_reason = "stop"
                return
        if len(c.token_ids) >= p.max_tokens or len(r.prompt_ids) + len(c.token_ids) >= \
                self.model.config.max_position_embeddings:
            c.finish_reason = "length"

    def _account(self, units: list[ScheduledUnit], num_tokens: int, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.prompt_tokens = self.scheduler.admitted_prompt_tokens
        s.cached_prompt_tokens = self.scheduler.admitted_cached_tokens
        s.computed_tokens += num_tokens
        s.busy_time += seconds
        if all(len(u.tokens) == 1 and u.completion is not None for u in units):
            s.decode_steps += 1
            s.decode_step_tokens += num_tokens
            s.decode_step_time += seconds
        live = self.cache.tree.num_live_slots * self.cache.chunk_bytes  # = stats()["used_chunks"], without a tree walk
        s.peak_live_kv_bytes = max(s.peak_live_kv_bytes, live)

    # ------------------------------------------------------------------ drivers
    def run_until_done(self, requests: list[Request],
                       on_finished: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Step until ``requests`` finish; ``on_finished(n)`` hears how many more finished after each step."""
        done = 0
        while any(r.state is not RequestState.FINISHED for r in requests):
            if not self.has_unfinished():
                raise EngineError("requests left unfinished with nothing scheduled")
            self.step()
            now_done = sum(r.finished for r in requests)
            if on_finished is not None and now_done != done:
                on_finished(now_done - done)
            done = now_done
        return [RequestOutput.of(r) for r in requests]
