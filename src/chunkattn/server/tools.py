"""Tool calling for ``/v1/chat/completions``: how ``tools`` + ``tool_choice`` become a constraint on the output,
and how the output becomes ``message.tool_calls``.

* ``"none"`` (the default without tools): plain text.
* a named function (``{"type": "function", "function": {"name": ...}}``): the output is constrained to the
  function's parameter schema; it *is* the call's ``arguments`` (streamed as argument deltas). Works with any
  model, whether or not its chat template knows tools.
* ``"required"``: the output is constrained to a JSON array of ``{"name": <one of the tools>, "arguments":
  <its parameters>}`` (at most one call when ``parallel_tool_calls`` is false, else at most
  :data:`MAX_PARALLEL_CALLS`); sent as ``tool_calls`` once complete. Works with any model.
* ``"auto"`` (the default with tools): only where the model's chat template renders tools (it gets them; give
  one with ``--chat-template``, e.g. ``examples/chat_templates/smollm2_tools.jinja``); the model then chooses
  between text and calls, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes / Qwen: one
  call a block) or ``<tool_call>[{...}, ...]</tool_call>`` (a list a block), parsed once the output is
  complete. A block becomes calls only when every entry in it names one of the request's tools with object
  arguments and the calls stay within the limit (one with ``parallel_tool_calls: false``); any other block
  stays in ``content`` as written. A template that does not render tools gets a 400 saying so (the model would
  never know the tools exist).

A finished call has ``finish_reason: "tool_calls"``; one cut by ``max_tokens`` keeps ``"length"``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from chunkattn.engine.structured import StructuredOutputs
from chunkattn.errors import InvalidParamError

MAX_PARALLEL_CALLS = 8
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def new_call_id() -> str:
    """A tool call's id, as OpenAI's look (``call_`` and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolPlan:
    """What a chat request's ``tools`` / ``tool_choice`` mean for this request."""

    mode: str  # "none", "named", "required", "auto"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool objects (for the template)
    name: str | None = None  # the named function
    max_calls: int = MAX_PARALLEL_CALLS  # "required" and "auto": 1 with parallel_tool_calls false

    @classmethod
    def of(cls, tools: list[Any] | None, tool_choice: Any, parallel: bool, template: str | None) -> ToolPlan:
        """Raises ``InvalidParamError`` for a choice that cannot be honoured."""
        specs = [t.model_dump() for t in tools or []]
        names = [t["function"]["name"] for t in specs]
        if len(set(names)) != len(names):
            raise InvalidParamError("tools: function names must be unique", "tools")
        choice = tool_choice if tool_choice is not None else ("auto" if specs else "none")
        if choice == "none":
            return cls("none")
        if not specs:
            raise InvalidParamError(f"tool_choice {choice!r} needs tools", "tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if choice.get("type") == "function" and isinstance(function, dict) else None
            if name is None:
                raise InvalidParamError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                        '"function": {"name": ...}}', "tool_choice")
            if name not in names:
                raise InvalidParamError(f"tool_choice names {name!r}, which is not among the tools "
                                        f"({', '.join(names)})", "tool_choice")
            return cls("named", specs, name)
        limit = MAX_PARALLEL_CALLS if parallel else 1
        if choice == "required":
            return cls("required", specs, max_calls=limit)
        if "tools" not in (template or ""):
            raise InvalidParamError('tool_choice "auto" needs a chat template that renders tools, and this '
                                    'model\'s does not; use "required" or a named function, which work with any '
                                    'model', "tool_choice")
        return cls("auto", specs, max_calls=limit)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def buffered(self) -> bool:
        """Whether a stream must wait for the whole output (calls are parsed once complete)."""
        return self.mode in ("required", "auto")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the chat template gets as ``tools``."""
        return self.tools if self.active else None

    def structured(self) -> StructuredOutputs | None:
        """The constraint on the output (None: free text)."""
        by_name = {t["function"]["name"]: t["function"] for t in self.tools}
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutputs(json=by_name[self.name]["parameters"])
        if self.mode == "required":
            calls, defs = [], {}
            for name, fn in by_name.items():
                parameters, own = _hoist_defs(name, fn["parameters"])
                defs.update(own)
                calls.append({"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                              "required": ["name", "arguments"], "additionalProperties": False})
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": self.max_calls,
                                      "items": {"anyOf": calls}}
            if defs:
                schema["$defs"] = defs
            return StructuredOutputs(json=schema)
        return None

    def calls(self, text: str) -> tuple[list[dict[str, Any]], str | None]:
        """``(tool_calls, content)`` of a complete output."""
        if self.mode == "named":
            assert self.name is not None
            return [_call(self.name, text)], None
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return [], text  # (cut by max_tokens: finish_reason says "length")
            return [_call(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items], None
        if self.mode == "auto":
            calls: list[dict[str, Any]] = []

            def convert(match: re.Match[str]) -> str:
                """A block whose every entry is a call of these tools (within max_calls) becomes those calls and
                leaves the text; any other block stays in the text as the model wrote it."""
                block = self._block_calls(match.group(1))
                if not block or len(calls) + len(block) > self.max_calls:
                    return match.group(0)
                calls.extend(block)
                return ""

            rest = _HERMES.sub(convert, text)
            if calls:
                return calls, rest.strip() or None
        return [], text

    def _block_calls(self, block: str) -> list[dict[str, Any]]:
        """The calls in one ``<tool_call>`` block (Hermes: one object; SmolLM2: a list of them), or [] unless every
        entry names one of the tools with object arguments (given as an object or as a JSON string)."""
        try:
            parsed = json.loads(block)
        except ValueError:
            return []
        out = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] in self.names):
                return []
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # (some models write the arguments as a JSON string)
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return []
            if not isinstance(arguments, dict):
                return []
            out.append(_call(item["name"], json.dumps(arguments, ensure_ascii=False)))
        return out


def _hoist_defs(name: str, schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool's parameter schema without its ``$defs`` / ``definitions`` (returned apart, renamed
    ``<tool>__<def>``, references rewritten): nested inside the "required" array schema, its ``#/$defs/...``
    references would point at that schema's root, which lacks them (pydantic-made schemas have them)."""
    defs = {f"{name}__{k}": v for key in ("$defs", "definitions") for k, v in (schema.get(key) or {}).items()}
    if not defs:
        return schema, {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for prefix in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(prefix):
                        out["$ref"] = f"#/$defs/{name}__{ref[len(prefix):]}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return rewrite(schema), {k: rewrite(v) for k, v in defs.items()}


def template_message(message: dict[str, Any], renders_tools: bool) -> dict[str, Any]:
    """A chat message as the template gets it: an assistant turn that only called tools, for a template
    that does not render ``tool_calls``, carries the calls as its content (so the model sees what it did)."""
    if renders_tools or message.get("role") != "assistant" or message.get("content") or \
            not message.get("tool_calls"):
        return message
    calls = [{"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
             for c in message["tool_calls"] if isinstance(c, dict)]
    return {**message, "content": json.dumps(calls, ensure_ascii=False)}


__all__ = ["MAX_PARALLEL_CALLS", "ToolPlan", "new_call_id", "template_message"]
