"""Structured outputs: constrain a completion to a JSON schema, a regex, a list of choices or a grammar.

The grammar engine is llguidance (a well-kept library, also one of vLLM's backends); the batching is ours:

* :class:`StructuredOutputs` (a ``SamplingParams`` field) says what the output must match.
* :class:`GrammarCompiler` (one per engine) turns it into an llguidance grammar once per distinct spec and
  keeps a compiled matcher per spec; each completion gets a cheap copy (:meth:`GrammarCompiler.matcher`).
  An invalid spec raises :class:`~chunkattn.errors.InvalidParamError` when the request is made, before anything
  runs.
* Each step, the model runner asks :func:`fill_masks` for the allowed tokens of every constrained row as one
  packed bitmask (llguidance's Rust code, the GIL released, started before the model runs so it overlaps it),
  and :func:`apply_masks` sets the other logits of those rows to -inf in one batched operation.
* After sampling, the engine advances each matcher by its token; a matcher that admits exactly one
  continuation for several tokens (keys, punctuation, constants) hands those over (``compute_ff_tokens``) and
  they are appended at once: computed in the next step as one prefill, not one decode step each
  ("jump-forward").

JSON is compact by default (no whitespace between tokens, "," and ":" as separators): small models under a
permissive grammar tend to emit whitespace until ``max_tokens``. Integer ranges, enums, ``maxLength``,
``maxItems`` and ``additionalProperties: false`` are enforced, so a bounded schema always ends.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from chunkattn.errors import InvalidParamError

log = logging.getLogger("chunkattn.structured")


@dataclass(frozen=True)
class StructuredOutputs:
    """What a completion must match: exactly one of ``json`` (a JSON schema as a dict or its JSON text; ``True``
    for any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (a Lark grammar as
    llguidance reads it, or GBNF/EBNF with ``::=`` rules). ``whitespace``: let JSON hold whitespace between
    tokens (compact JSON by default)."""

    json: dict[str, Any] | str | bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParamError(f"structured outputs take exactly one of json, regex, choice and grammar; got "
                                    f"{', '.join(given) or 'none'}", "structured_outputs")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParamError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                        "structured_outputs")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParamError(f"structured_outputs.{name} must be a non-empty string", "structured_outputs")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise InvalidParamError(f"the JSON schema is not valid JSON: {exc}", "structured_outputs") from None
            object.__setattr__(self, "json", parsed)
        if self.json is not None and self.json is not True and not isinstance(self.json, dict):
            raise InvalidParamError("a JSON schema must be an object (or true for any JSON object)",
                                    "structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text of the spec (the compiler's cache key)."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value if not isinstance(value, tuple) else list(value), self.whitespace],
                          sort_keys=True)

    def grammar_text(self) -> str:
        """The llguidance grammar of this spec."""
        import llguidance

        options: Any = None if self.whitespace else {"whitespace_flexible": False}
        if self.json is not None:
            schema: Any = {"type": "object"} if self.json is True else self.json
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options))
        if self.regex is not None:
            return str(llguidance.LLMatcher.grammar_from_regex(self.regex))
        if self.choice is not None:
            return str(llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice)))
        assert self.grammar is not None
        text = self.grammar
        if "::=" in text:  # GBNF / EBNF (llama.cpp's and xgrammar's notation)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            text = gbnf_to_lark(text)
        return str(llguidance.LLMatcher.grammar_from_lark(text))


@dataclass
class StructuredStats:
    """Counters of an engine's structured outputs (read by /metrics)."""

    requests: int = 0  # requests with structured outputs
    compiled: int = 0  # distinct specs compiled
    compile_seconds: list[float] | None = None  # each compilation's time (drained by metrics)
    mask_seconds: float = 0.0  # time computing and applying masks, summed over steps
    mask_steps: int = 0  # steps that computed masks
    forced_tokens: int = 0  # tokens appended by jump-forward (a decode step each, saved)

    def __post_init__(self) -> None:
        self.compile_seconds = []


class GrammarCompiler:
    """Compiles :class:`StructuredOutputs` for ``tokenizer`` (a Hugging Face tokenizer) once per distinct spec
    (an LRU of ``capacity`` compiled matchers) and hands out a matcher per completion."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...], capacity: int = 256):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.capacity = capacity
        self.stats = StructuredStats()
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # (requests are made on server threads, matchers used on the engine's)
        self._tokenizer_lock = threading.Lock()
        self._executor: Any = None

    def _lltokenizer(self) -> Any:
        with self._tokenizer_lock:  # (built once, ~2 s: a second caller waits for the first)
            if self._tokenizer is None:
                try:
                    import llguidance
                    import llguidance.hf
                except ImportError as exc:  # pragma: no cover - a declared dependency
                    raise InvalidParamError(f"structured outputs need llguidance: pip install llguidance ({exc})",
                                            "structured_outputs") from None
                if self.hf_tokenizer is None:
                    raise InvalidParamError("structured outputs need the model's tokenizer (this model has none)",
                                            "structured_outputs")
                start = time.perf_counter()
                tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                         eos_token=list(self.eos_token_ids) or None)
                warm = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex("a"), log_level=0)
                self._tokenizer = tokenizer
                fill_masks(self, [(warm, 0)], 1)  # (the first mask builds llguidance's token tables: ~2 s once)
                log.info("structured outputs: llguidance tokenizer built in %.2f s", time.perf_counter() - start)
            return self._tokenizer

    def is_compiled(self, spec: StructuredOutputs) -> bool:
        """Whether :meth:`matcher` would only copy (no compilation): a server compiles off its event loop
        first (:meth:`matcher` in a worker thread) when this is False."""
        with self._lock:
            return self._tokenizer is not None and spec.key() in self._compiled

    def matcher(self, spec: StructuredOutputs) -> Any:
        """A fresh matcher for ``spec`` (compiled once, then copied). Raises ``InvalidParamError`` naming the
        problem when the spec is invalid. Compiling holds no lock (two threads may compile the same new spec
        once each; the cache keeps one)."""
        import llguidance

        key = spec.key()
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        tokenizer = self._lltokenizer()
        start = time.perf_counter()
        try:
            grammar = spec.grammar_text()
        except Exception as exc:  # noqa: BLE001 - e.g. gbnf_to_lark's own errors: all the client's input
            raise InvalidParamError(f"invalid {spec.kind} for structured outputs: {_short(str(exc))}",
                                    "structured_outputs") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidParamError(f"invalid {spec.kind} for structured outputs: {_short(error)}",
                                    "structured_outputs")
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidParamError(f"invalid {spec.kind} for structured outputs: "
                                    f"{_short(template.get_error())}", "structured_outputs")
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.compiled += 1
            assert self.stats.compile_seconds is not None
            if len(self.stats.compile_seconds) < 100_000:  # (bounded: a histogram's input)
                self.stats.compile_seconds.append(seconds)
            self._compiled[key] = template
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def executor(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor


def _short(message: str) -> str:
    return message if len(message) <= 500 else message[:497] + "..."


def fill_masks(compiler: GrammarCompiler, matchers: list[tuple[Any, int]], rows: int) -> torch.Tensor:
    """The packed allowed-token bitmask ``[rows, ceil(V / 32)]`` int32 of each constrained row (``(matcher, row)``
    pairs); other rows allow everything."""
    from llguidance.torch import fill_next_token_bitmask_par

    width = (compiler.vocab_size + 31) // 32
    bitmask = torch.full((rows, width), -1, dtype=torch.int32)
    if matchers:
        fill_next_token_bitmask_par(compiler.executor(), matchers, bitmask)
    return bitmask


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], inplace: bool = False
                ) -> torch.Tensor:
    """``logits [R, V]`` with the tokens that the packed ``bitmask [R, W]`` disallows set to -inf, on the
    constrained ``rows`` only (one batched operation; in place when ``inplace``, else on a copy). On the CPU in
    float32 one native pass (``chunkattn_layers::apply_token_bitmask_``), else unpacked bits and ``masked_fill``."""
    import numpy as np

    from chunkattn import native

    vocab = logits.shape[1]
    every = rows == list(range(logits.shape[0]))
    packed = bitmask if every else bitmask[rows]  # [C, W] int32
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and \
            native.available():
        out = logits if inplace else logits.clone()
        torch.ops.chunkattn_layers.apply_token_bitmask_(out, packed.contiguous(), torch.tensor(rows, dtype=torch.int64))
        return out
    bits = np.unpackbits(packed.numpy().view(np.uint8), axis=1, bitorder="little")  # [C, 32 W] (LSB first)
    blocked = torch.from_numpy(bits).view(torch.bool)[:, :vocab].logical_not().to(logits.device)
    out = logits if inplace else logits.clone()
    if every:
        out.masked_fill_(blocked, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        out.index_copy_(0, index, out.index_select(0, index).masked_fill_(blocked, float("-inf")))
    return out


__all__ = ["GrammarCompiler", "StructuredOutputs", "StructuredStats", "apply_masks", "fill_masks"]
