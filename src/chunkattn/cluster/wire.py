"""What travels between the ingress and the replicas: the requests (:class:`ReplicaRequest`, :class:`ToReplica`)
and the outputs, deltas only, the full state rebuilt on arrival. Plain Python, no Ray.

An engine's :class:`~chunkattn.engine.request.RequestOutput` carries everything so far (the prompt's ids, each
completion's text, ids and logprobs) besides what is new; sent after every step that is quadratic in the
output length. A replica sends :func:`slim` outputs (what is new, and the prompt only in the first) and the
ingress's :class:`OutputAssembler` rebuilds the full outputs, equal to the engine's own. (Per-token
timestamps, ``token_times``, are not carried: the request's ``metrics`` are.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chunkattn.engine.request import CompletionOutput, RequestOutput, TokenLogprob
from chunkattn.engine.sampling import SamplingParams


@dataclass
class ReplicaRequest:
    """One engine request as a replica receives it (the first argument of the call: routers read it)."""

    token_ids: list[int]
    params: SamplingParams
    request_id: str
    cache_salt: str | None = None

    @property
    def prompt(self) -> str:
        """The ids as a string, one character per token: what Ray's character-level prefix router matches."""
        return "".join(map(chr, self.token_ids))


@dataclass
class ToReplica:
    """The first argument of a call meant for one replica, the ``index``-th by id modulo their number (e.g.
    for /metrics): :class:`~chunkattn.cluster.ray_router.PrefixRouter` sends it there whatever the policy."""

    index: int
    prompt: str = "\x00"  # (Ray's prefix router reads it, and divides by its length)


def slim(out: RequestOutput, first: bool) -> RequestOutput:
    """``out`` without what the receiver already has (``first``: nothing yet, so the prompt goes along)."""
    outputs = [dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                   token_times=[]) for c in out.outputs]
    return dataclasses.replace(out, outputs=outputs, prompt_token_ids=out.prompt_token_ids if first else (),
                               prompt_logprobs=out.prompt_logprobs if first else None)


@dataclass
class _Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class OutputAssembler:
    """Rebuilds full outputs from one request's :func:`slim` outputs, in order."""

    def __init__(self) -> None:
        self.prompt_token_ids: tuple[int, ...] = ()
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._completions: dict[int, _Completion] = {}

    def __call__(self, out: RequestOutput) -> RequestOutput:
        if out.prompt_token_ids:
            self.prompt_token_ids = tuple(out.prompt_token_ids)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        outputs: list[CompletionOutput] = []
        for c in out.outputs:
            acc = self._completions.setdefault(c.index, _Completion())
            acc.text += c.delta_text
            acc.token_ids.extend(c.delta_token_ids)
            if c.delta_logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + list(c.delta_logprobs)
            outputs.append(dataclasses.replace(c, text=acc.text, token_ids=list(acc.token_ids),
                                               logprobs=None if c.logprobs is None else list(acc.logprobs or [])))
        return dataclasses.replace(out, outputs=outputs, prompt_token_ids=self.prompt_token_ids,
                                   prompt_logprobs=self.prompt_logprobs)
