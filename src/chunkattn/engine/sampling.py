"""``SamplingParams``: how to generate the completions of one request (OpenAI's and vLLM's fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from chunkattn.engine.structured import StructuredOutputs
from chunkattn.errors import InvalidParamError

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's limit)


def _check_range(name: str, value: float, low: float, high: float, param: str | None = None) -> None:
    if not low <= value <= high:
        raise InvalidParamError(f"{name} must be in [{low}, {high}], got {value}", param or name)


@dataclass
class SamplingParams:
    """How to generate ``n`` completions of a prompt.

    Sampling: ``temperature=0`` is greedy; ``top_k`` (0 or -1: off), ``top_p`` (1: off) and ``min_p`` (0: off)
    filter the distribution. ``seed`` makes sampling reproducible whatever else is in the batch (completion
    ``i`` of ``n`` uses ``seed + i``). Penalties: ``presence_penalty`` and ``frequency_penalty`` (OpenAI's,
    on generated tokens), ``repetition_penalty`` (CTRL's, on prompt and generated tokens, 1: off);
    ``logit_bias`` adds a bias in [-100, 100] to a token's logit. They apply to greedy decoding too.

    Stopping: at ``max_tokens``, at the model's end-of-sequence token (unless ``ignore_eos``), at any of
    ``stop_token_ids`` (kept in ``token_ids``), or when the text contains one of ``stop`` (cut from the text
    unless ``include_stop_str_in_output``). Neither end-of-sequence nor stop tokens end a completion before
    ``min_tokens`` tokens.

    Structure: ``structured`` (:class:`~chunkattn.engine.structured.StructuredOutputs`) constrains the output to
    a JSON schema, a regex, a choice or a grammar; the completion stops when the structure is complete (the
    grammar decides when it may end: ``min_tokens`` and ``ignore_eos`` do not apply).

    Logprobs: ``logprobs=k`` returns, for every generated token, its log-probability and the ``k`` most likely
    alternatives (0: only the sampled token's); ``prompt_logprobs=k`` the same for every prompt token after the
    first. Log-probabilities are of the model's distribution (before temperature, penalties and filters).
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        for name in ("n", "max_tokens", "min_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.n < 1:
            raise InvalidParamError(f"n must be >= 1, got {self.n}", "n")
        if self.max_tokens < 1:
            raise InvalidParamError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParamError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                                    "min_tokens")
        if self.temperature < 0:
            raise InvalidParamError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", "temperature")
        if self.top_k < -1:
            raise InvalidParamError(f"top_k must be >= 1, or 0 / -1 for no limit, got {self.top_k}", "top_k")
        if self.top_k == -1:
            self.top_k = 0
        if not 0 < self.top_p <= 1:
            raise InvalidParamError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not 0 < self.repetition_penalty <= 10:
            raise InvalidParamError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                                    "repetition_penalty")
        bias: dict[int, float] = {}
        for token, value in dict(self.logit_bias or {}).items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise InvalidParamError(f"logit_bias keys must be token ids, got {token!r}", "logit_bias") from None
            _check_range(f"logit_bias[{token_id}]", float(value), -100.0, 100.0, "logit_bias")
            bias[token_id] = float(value)
        self.logit_bias = bias
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{name} must be an int or None, got {value!r}")
                _check_range(name, value, 0, MAX_LOGPROBS)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParamError("stop strings must be non-empty strings", "stop")
        if isinstance(self.structured, dict):
            self.structured = StructuredOutputs(**self.structured)
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise TypeError(f"structured must be a StructuredOutputs (or a dict of its fields), got "
                            f"{type(self.structured).__name__}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SamplingParams:
        """``SamplingParams(**fields)``, naming the unknown fields if there are any."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in fields if k not in known)
        if unknown:
            raise TypeError(f"SamplingParams has no field(s) {', '.join(unknown)}; its fields: "
                            f"{', '.join(sorted(known))}")
        return cls(**fields)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with ``changes`` applied."""
        return SamplingParams(**{**self.__dict__, **changes})
