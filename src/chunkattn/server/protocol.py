"""The OpenAI-compatible wire format: request bodies (validated by pydantic) and their mapping onto
:class:`~chunkattn.engine.sampling.SamplingParams`.

Unknown fields are accepted and ignored, as OpenAI's clients and vLLM's server expect. Numbers are
bounded here, before anything reaches the engine, so that no request can make the server allocate without
limit (``n``, ``logprobs``, ``max_tokens``) and every rejection names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from chunkattn.engine.llm import CHAT_ROLES
from chunkattn.engine.sampling import MAX_LOGPROBS, SamplingParams
from chunkattn.engine.structured import StructuredOutputs
from chunkattn.errors import InvalidParamError

MAX_N = 128  # completions per prompt
MAX_PROMPTS = 256  # prompts per completions request
MAX_CHOICES = 1024  # prompts x n per request
MAX_STOP = 16  # stop strings per request

ROLES = CHAT_ROLES

NonNegInt = Annotated[StrictInt, Field(ge=0)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as is (the server prefixes the field's name)."""
    return PydanticCustomError("invalid", message)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_text(text: str) -> str:
    """``text`` if it is valid Unicode (no lone UTF-16 surrogate, which JSON's ``\\ud800`` escapes can carry
    but UTF-8 and tokenizers cannot); otherwise a validation error saying where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(f"the text holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character "
                       f"{exc.start}), which is not valid Unicode") from None
    return text


def _check_token_ids(ids: list[Any], where: str) -> None:
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            kind = "a number with a fraction" if isinstance(t, float) else type(t).__name__
            raise _invalid(f"token ids must be non-negative integers; {where}[{i}] is {_describe(t)} ({kind})")
        if t < 0:
            raise _invalid(f"token ids must be non-negative integers; {where}[{i}] is {t}")


def check_prompt(value: Any) -> Any:
    """The ``prompt`` of /v1/completions checked with messages that name the real problem (a union type's
    own errors would all say "should be a valid string")."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str):
        return check_text(value)
    if not isinstance(value, list):
        raise _invalid(f"must be {shapes}; got {type(value).__name__}")
    if not value:
        raise _invalid("the prompt is empty (an empty list)")
    if all(isinstance(x, str) for x in value):
        if len(value) > MAX_PROMPTS:
            raise _invalid(f"at most {MAX_PROMPTS} prompts per request; got {len(value)}")
        for x in value:
            check_text(x)
        return value
    if all(isinstance(x, list) for x in value):
        if len(value) > MAX_PROMPTS:
            raise _invalid(f"at most {MAX_PROMPTS} prompts per request; got {len(value)}")
        for i, ids in enumerate(value):
            if not ids:
                raise _invalid(f"prompt {i} is empty (an empty list of token ids)")
            _check_token_ids(ids, f"prompt[{i}]")
        return value
    if any(isinstance(x, (str, list, dict)) for x in value):
        raise _invalid(f"must be {shapes}, not a mix; got {_describe(value)}")
    _check_token_ids(value, "prompt")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=1024)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    min_tokens: NonNegInt = 0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None \
        = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    user: StrictStr | None = None
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    response_format: dict[str, Any] | None = None  # OpenAI's: text, json_object, json_schema
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar (+ whitespace)
    guided_json: dict[str, Any] | StrictStr | None = None  # vLLM's older spellings of the same
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    def structured(self) -> StructuredOutputs | None:
        """The output structure the body asks for (``response_format``, ``structured_outputs`` or the
        ``guided_*`` fields; at most one of them), or None. Raises ``InvalidParamError`` naming the field."""
        guided = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                  if getattr(self, f"guided_{k}") is not None}
        given = [name for name, present in (("response_format", self._format_constrains()),
                                            ("structured_outputs", self.structured_outputs is not None),
                                            ("guided_*", bool(guided))) if present]
        if len(given) > 1:
            raise InvalidParamError(f"give at most one of response_format, structured_outputs and guided_*; got "
                                    f"{' and '.join(given)}", given[1])
        if guided:
            return _structured(guided, "guided_" + next(iter(guided)))
        if self.structured_outputs is not None:
            return _structured(self.structured_outputs, "structured_outputs")
        if self._format_constrains():
            assert self.response_format is not None
            if self.response_format["type"] == "json_object":
                return StructuredOutputs(json=True)
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise InvalidParamError("response_format.json_schema must be an object {name, schema, strict}",
                                        "response_format")
            return _structured({"json": spec.get("schema", {"type": "object"})}, "response_format")
        return None

    def _format_constrains(self) -> bool:
        fmt = self.response_format
        if fmt is None:
            return False
        kind = fmt.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise InvalidParamError(f"response_format.type must be text, json_object or json_schema; got {kind!r}",
                                    "response_format")
        return kind != "text"

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) > MAX_STOP:
                raise _invalid(f"at most {MAX_STOP} stop strings; got {len(value)}")
            for i, s in enumerate(value):
                if not isinstance(s, str):
                    raise _invalid(f"stop strings must be strings; stop[{i}] is {_describe(s)}")
                if not s:
                    raise _invalid(f"stop strings must not be empty; stop[{i}] is \"\"")
                check_text(s)
        elif isinstance(value, str):
            if not value:
                raise _invalid("stop strings must not be empty")
            check_text(value)
        elif value is not None:
            raise _invalid(f"must be a string or a list of at most {MAX_STOP} strings; got {type(value).__name__}")
        return value

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidParamError(f"logit_bias: keys must be token ids, got {key!r}", "logit_bias") from None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias,
            seed=None if self.seed is None else self.seed % 2**64, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            structured=self.structured())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def _structured(fields: dict[str, Any], param: str) -> StructuredOutputs:
    known = {"json", "regex", "choice", "grammar", "whitespace"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InvalidParamError(f"{param}: unknown field(s) {', '.join(unknown)}; it takes one of json, regex, "
                                f"choice, grammar (and whitespace)", param.removesuffix("_json"))
    try:
        return StructuredOutputs(**fields)
    except InvalidParamError as exc:
        raise InvalidParamError(str(exc), param) from None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: ToolFunction


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids or lists of token ids."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return check_prompt(value)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """A chat message: ``role`` one of :data:`ROLES`; ``content`` text or OpenAI's text parts (None only where
    the turn carries something else, e.g. an assistant's ``tool_calls``). Other fields go to the template."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise _invalid(f"unknown role {_describe(value)}; one of {', '.join(ROLES)}")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if isinstance(value, str):
            check_text(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part.get("text"), str):
                    check_text(part["text"])
        return value

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # OpenAI's content parts: only text is supported
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("messages: only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: ``prompt`` text, or chat ``messages`` through the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[NonNegInt]


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error",
                    "service_unavailable"]


def error_body(message: str, type_: ErrorType, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
