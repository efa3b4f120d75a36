"""Structured outputs and tool calling: the engine with the default model (SmolLM2-135M-Instruct), and a real
``chunkattn serve`` process driven by the official ``openai`` client. Every output is checked against its
schema (jsonschema), regex or choice list."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from chunkattn import LLM, SamplingParams
from chunkattn.engine.structured import StructuredOutputs
from chunkattn.errors import InvalidParamError
from chunkattn.server.tools import ToolPlan
from server_helpers import ServerProcess

SYSTEM = ("You are the booking assistant of the Hotel Miramar. Rooms: single (80 EUR), double (120 EUR), suite "
          "(300 EUR). Stays of 1 to 14 nights. Answer only with the data asked for.")
BOOKING = {"type": "object", "properties": {
    "room": {"enum": ["single", "double", "suite"]},
    "nights": {"type": "integer", "minimum": 1, "maximum": 14},
    "guest": {"type": "string", "maxLength": 24},
    "breakfast": {"type": "boolean"}},
    "required": ["room", "nights", "guest", "breakfast"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "book_room", "description": "Book a room",
    "parameters": {"type": "object", "properties": {"room": {"enum": ["single", "double", "suite"]},
                                                    "nights": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["room", "nights"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]


def _schemas(count: int) -> list[dict]:
    """Distinct bounded schemas (different keys, ranges, enums, arrays)."""
    out = []
    for i in range(count):
        props: dict = {f"field_{i}": {"type": "integer", "minimum": i, "maximum": i + 10},
                       "label": {"enum": [f"a{i}", f"b{i}"]}}
        if i % 2:
            props["tags"] = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}
        if i % 3 == 0:
            props["note"] = {"type": "string", "maxLength": 12}
        out.append({"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})
    return out


# ---------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_tokens=16384)


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schema_outputs_validate_and_stop(llm, temperature):
    prompt = _chat(llm, "Book a double room for 3 nights for Ann, with breakfast. Reply in JSON.")
    params = SamplingParams(n=3, max_tokens=80, temperature=temperature, seed=7,
                            structured=StructuredOutputs(json=BOOKING))
    (out,) = llm.generate([prompt], params)
    for c in out.outputs:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), BOOKING)
        assert " " not in c.text.replace(json.loads(c.text)["guest"], "")  # compact JSON


def test_regex_choice_and_grammars(llm):
    prompt = _chat(llm, "Give a phone number and say whether the sky is blue.")
    cases = [(StructuredOutputs(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
             (StructuredOutputs(choice=["yes", "no", "it depends"]), lambda t: t in ("yes", "no", "it depends")),
             (StructuredOutputs(grammar='root ::= "ID-" [0-9] [0-9] [0-9]'), lambda t: re.fullmatch(r"ID-\d{3}", t)),
             (StructuredOutputs(grammar='start: "ID-" /[0-9]{3}/'), lambda t: re.fullmatch(r"ID-\d{3}", t))]
    for spec, ok in cases:
        for temperature in (0.0, 1.0):
            (out,) = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=temperature, seed=3,
                                                           structured=spec))
            assert out.outputs[0].finish_reason == "stop" and ok(out.text), (spec, out.text)


def test_jump_forward_saves_steps_with_the_same_tokens(llm):
    prompt = _chat(llm, "Book a suite for 2 nights for Bo, no breakfast. Reply in JSON.")
    params = SamplingParams(max_tokens=80, temperature=0, structured=StructuredOutputs(json=BOOKING))
    results = {}
    for jump in (False, True):
        llm.engine.config.jump_forward = jump
        steps, forced = llm.engine.stats.steps, llm.engine.grammars.stats.forced_tokens
        (out,) = llm.generate([prompt], params)
        results[jump] = (out.token_ids, llm.engine.stats.steps - steps,
                         llm.engine.grammars.stats.forced_tokens - forced)
    llm.engine.config.jump_forward = True
    assert results[True][0] == results[False][0]  # greedy: the same tokens either way
    assert results[False][2] == 0 and results[True][2] >= 8  # the keys and punctuation were forced
    assert results[True][1] <= results[False][1] - results[True][2] // 2, results


def test_invalid_specs_fail_when_the_request_is_made(llm):
    for spec, words in [(dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "nonsense"),
                        (dict(regex="(unclosed"), "unclosed"), (dict(grammar="start: undefined_rule"), "grammar"),
                        (dict(json=True, regex="a"), "exactly one"), (dict(choice=[]), "non-empty list"),
                        (dict(json="{not json"), "not valid JSON")]:
        with pytest.raises(InvalidParamError, match=words):
            llm.generate([1, 2, 3], SamplingParams(structured=StructuredOutputs(**spec)))
    assert llm.engine.scheduler.running == [] and not llm.engine.scheduler.waiting


def test_tool_plans():
    from chunkattn.server.protocol import Tool

    tools = [Tool.model_validate(t) for t in TOOLS]
    assert ToolPlan.of(None, None, True, None).mode == "none"
    named = ToolPlan.of(tools, {"type": "function", "function": {"name": "get_weather"}}, True, None)
    assert named.structured().json == TOOLS[1]["function"]["parameters"]
    calls, content = named.calls('{"city":"Oslo"}')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    required = ToolPlan.of(tools, "required", False, None)
    assert required.structured().json["maxItems"] == 1
    with pytest.raises(InvalidParamError, match="renders tools"):
        ToolPlan.of(tools, "auto", True, "{{ messages }}")
    with pytest.raises(InvalidParamError, match="not among the tools"):
        ToolPlan.of(tools, {"type": "function", "function": {"name": "nope"}}, True, None)
    auto = ToolPlan.of(tools, "auto", True, "{% if tools %}...{% endif %}")
    calls, content = auto.calls('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert content == "Sure." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert auto.calls("just text") == ([], "just text")
    # a list of calls in one block (SmolLM2's format), arguments written as a JSON string, and what is not a
    # call of these tools (unknown name, arguments not an object, broken JSON) left as text
    calls, content = auto.calls('<tool_call>[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                                '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]</tool_call>')
    assert content is None and [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Rome", "Oslo"]
    assert len({c["id"] for c in calls}) == 2
    for text in ('<tool_call>[{"name": "launch_rocket", "arguments": {}}]</tool_call>',
                 '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
                 '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', "<tool_call>[]</tool_call>"):
        assert auto.calls(text) == ([], text), text
    # beside a valid block, what is not a call stays in the content as written (a block with an unknown entry
    # whole); with parallel_tool_calls false, a second call stays text too
    rome = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    mixed = ('<tool_call>[{"name": "get_weather", "arguments": {}}, {"name": "launch_rocket", "arguments": {}}]'
             '</tool_call>')
    calls, content = auto.calls(f"{rome} then {mixed} and <tool_call>{{broken</tool_call>")
    assert len(calls) == 1 and content == f"then {mixed} and <tool_call>{{broken</tool_call>"
    single = ToolPlan.of(tools, "auto", False, "{% if tools %}...{% endif %}")
    calls, content = single.calls(rome + rome)
    assert len(calls) == 1 and content == rome
    assert len(auto.calls(rome + rome)[0]) == 2


# ---------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--served-model-name", "smol", "--kv-cache-tokens", "32768", api_key="sk-s")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-s", max_retries=0, timeout=120) as c:
        yield c


def _messages(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def test_response_format_json_schema_and_json_object(client):
    r = client.chat.completions.create(
        model="smol", messages=_messages("Book a single room for 5 nights for Li, breakfast included."),
        max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "booking", "schema": BOOKING, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), BOOKING)
    r = client.chat.completions.create(model="smol", messages=_messages("Describe the hotel as a JSON object."),
                                       max_tokens=60, temperature=0, response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    r = client.completions.create(model="smol", prompt="Three colours as JSON: ", max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"json": {
                                      "type": "array", "items": {"enum": ["red", "green", "blue"]},
                                      "minItems": 3, "maxItems": 3}}})
    assert r.choices[0].finish_reason == "stop" and len(json.loads(r.choices[0].text)) == 3


def test_sixteen_concurrent_schemas_sharing_one_system_prompt(server):
    schemas = _schemas(16)

    async def main() -> list[tuple[dict, str, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-s", max_retries=0, timeout=300) as c:
            async def one(i: int) -> tuple[dict, str, str]:
                r = await c.chat.completions.create(
                    model="smol", messages=_messages(f"Fill in record number {i}."), max_tokens=100,
                    temperature=0 if i % 2 else 0.8, seed=i,
                    response_format={"type": "json_schema", "json_schema": {"name": f"r{i}", "schema": schemas[i]}})
                return schemas[i], r.choices[0].message.content, r.choices[0].finish_reason
            return await asyncio.gather(*(one(i) for i in range(16)))

    for schema, text, reason in asyncio.run(main()):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice_through_the_server(client):
    r = client.completions.create(model="smol", prompt="A room number: ", max_tokens=10, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": r"[1-4]0[1-9]"}})
    assert re.fullmatch(r"[1-4]0[1-9]", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smol", messages=_messages("Is breakfast included?"), max_tokens=10,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")


def test_named_tool_call_plain_and_streamed(client):
    choice = {"type": "function", "function": {"name": "book_room"}}
    r = client.chat.completions.create(model="smol", messages=_messages("Book a double for 4 nights."),
                                       tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "book_room"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    # streamed: the client assembles the argument deltas
    stream = client.chat.completions.create(model="smol", messages=_messages("Book a suite for 1 night."),
                                            tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0, stream=True)
    name, args, reasons, ids = None, "", [], set()
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                ids.add(tc.id) if tc.id else None
                name = tc.function.name or name
                args += tc.function.arguments or ""
            reasons.append(ch.finish_reason)
    assert name == "book_room" and len(ids) == 1 and reasons[-1] == "tool_calls"
    jsonschema.validate(json.loads(args), TOOLS[0]["function"]["parameters"])


def test_required_tool_calls_and_the_next_turn(client):
    messages = _messages("What is the weather in Paris?")
    r = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=80, temperature=0, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the assistant's call and the tool's answer go back in the next request
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 21 C"}'}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    # streamed: the calls arrive whole in one delta, once the output is complete
    stream = client.chat.completions.create(model="smol", messages=_messages("Weather in Rome?"), tools=TOOLS,
                                            tool_choice="required", max_tokens=80, temperature=0, stream=True)
    calls = [tc for chunk in stream for ch in chunk.choices for tc in (ch.delta.tool_calls or [])]
    assert calls and all(tc.id and tc.function.name in ("book_room", "get_weather") for tc in calls)


def test_structured_errors_are_400_before_anything_runs(server):
    h = {"Authorization": "Bearer sk-s"}
    for body, words, param in [
        ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
         "nonsense", "structured_outputs"),
        ({"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}, "unclosed", "structured_outputs"),
        ({"prompt": "x", "structured_outputs": {"jsn": {}}}, "unknown field", "structured_outputs"),
        ({"prompt": "x", "response_format": {"type": "yaml"}}, "json_schema", "response_format"),
        ({"prompt": "x", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
         "at most one", "structured_outputs"),
    ]:
        r = httpx.post(server.url + "/v1/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                   json={"messages": _messages("hi"), "tools": TOOLS, "tool_choice": "auto"})
    assert r.status_code == 400 and "renders tools" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                   json={"messages": _messages("hi"), "tools": TOOLS, "tool_choice": "none", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    text = httpx.get(server.url + "/metrics").text
    requests = re.search(r'chunkattn:structured_requests_total\{model_name="smol"\} (\S+)', text)
    forced = re.search(r'chunkattn:structured_forced_tokens_total\{model_name="smol"\} (\S+)', text)
    assert requests and float(requests.group(1)) > 0 and forced and float(forced.group(1)) > 0
    assert "chunkattn:structured_grammar_compile_seconds_bucket" in text


TOOLS_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "chat_templates" / "smollm2_tools.jinja"
CALL_REGEX = r'<tool_call>\[\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,12}"\}\}\]</tool_call>'


@pytest.fixture(scope="module")
def tools_client():
    """A server whose chat template renders tools (``--chat-template``): tool_choice "auto" works there."""
    s = ServerProcess("--served-model-name", "smol", "--kv-cache-tokens", "16384", "--chat-template",
                      str(TOOLS_TEMPLATE))
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            yield c
    finally:
        s.stop()


def test_the_tools_template_renders_as_the_models_own_without_tools():
    from chunkattn.engine.args import read_chat_template
    from chunkattn.model.loader import default_model_path, load_tokenizer

    tok = load_tokenizer(default_model_path())
    ours = read_chat_template(TOOLS_TEMPLATE)
    for conv in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "x"}]):
        for generation_prompt in (True, False):
            assert tok.apply_chat_template(conv, add_generation_prompt=generation_prompt, tokenize=False,
                                           chat_template=ours) == \
                tok.apply_chat_template(conv, add_generation_prompt=generation_prompt, tokenize=False)
    with_tools = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS, tokenize=False,
                                         add_generation_prompt=True, chat_template=ours)
    assert '"name": "book_room"' in with_tools and "<tool_call>[" in with_tools


def test_tool_choice_auto_end_to_end(tools_client):
    """tool_choice "auto" through a real server with a template that renders tools: the tools reach the prompt;
    the model's answer comes back as text or as calls; an output in the template's call format becomes
    ``tool_calls`` (whole and streamed, assembled by the client); a next turn with the calls and a tool message
    renders."""
    question = [{"role": "user", "content": "What is the weather in Rome?"}]
    plain = tools_client.chat.completions.create(model="smol", messages=question, max_tokens=24, temperature=0)
    auto = tools_client.chat.completions.create(model="smol", messages=question, tools=TOOLS, tool_choice="auto",
                                                max_tokens=24, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the template rendered the tools
    choice = auto.choices[0]
    if choice.message.tool_calls:  # (SmolLM2-135M answers in text here; a call must then be a valid one)
        assert choice.finish_reason == "tool_calls"
        assert all(c.function.name in ("get_weather", "book_room") for c in choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    # an output in the call format (forced here by a regex: the small model does not call tools by itself)
    forced = {"structured_outputs": {"regex": CALL_REGEX}}
    r = tools_client.chat.completions.create(model="smol", messages=question, tools=TOOLS, tool_choice="auto",
                                             max_tokens=60, temperature=0, extra_body=forced)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    city = json.loads(call.function.arguments)["city"]
    assert re.fullmatch(r"[A-Z][a-z]{2,12}", city)
    with tools_client.chat.completions.stream(model="smol", messages=question, tools=TOOLS, tool_choice="auto",
                                              max_tokens=60, temperature=0, extra_body=forced) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {"city": city}
    # the next turn: the assistant's calls and the tool's answer in the history
    called = {"id": call.id, "type": "function",
              "function": {"name": "get_weather", "arguments": call.function.arguments}}
    history = [*question, {"role": "assistant", "content": None, "tool_calls": [called]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    after = tools_client.chat.completions.create(model="smol", messages=history, tools=TOOLS, max_tokens=16,
                                                 temperature=0)
    assert after.usage.prompt_tokens > auto.usage.prompt_tokens + 10
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("native_path", [True, False])
def test_apply_masks_matches_the_bits(native_path, monkeypatch):
    """Both paths (the native pass on CPU float32, the unpacked-bits fallback) against the bits one by one:
    vocabularies ending inside a word, words all allowed or all blocked, a subset of rows, in place or not."""
    import torch

    from chunkattn import native
    from chunkattn.engine.structured import apply_masks

    if native_path and not native.available():
        pytest.skip("the native CPU extension is not available here (no compiler)")
    if not native_path:
        monkeypatch.setattr(native, "available", lambda: False)
    gen = torch.Generator().manual_seed(11)
    for rows_total, vocab in [(5, 70), (3, 64), (8, 1000), (2, 33), (4, 49152)]:
        width = (vocab + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows_total, width), dtype=torch.int32, generator=gen)
        bitmask[:, 0] = -1  # every token of the first word allowed ...
        bitmask[:, -1] = 0  # ... none of the last
        logits = torch.randn(rows_total, vocab, generator=gen)
        bits = torch.tensor([[(int(w) >> b) & 1 for w in row for b in range(32)][:vocab] for row in bitmask.tolist()],
                            dtype=torch.bool)
        for rows in ([0, rows_total - 1], list(range(rows_total))):
            for inplace in (False, True):
                source = logits.clone()
                out = apply_masks(source, bitmask, rows, inplace=inplace)
                allowed = bits.clone()
                allowed[[r for r in range(rows_total) if r not in rows]] = True
                assert torch.equal(out, torch.where(allowed, logits, float("-inf")))
                assert (out is source) == inplace and (inplace or torch.equal(source, logits))


def test_required_tools_with_defs_compile_and_validate(llm):
    """Tool parameters with $defs (as pydantic writes them) nest into the "required" array schema."""
    from chunkattn.server.protocol import Tool

    params = {"type": "object", "$defs": {"Loc": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}},
        "properties": {"where": {"$ref": "#/$defs/Loc"}}, "required": ["where"], "additionalProperties": False}
    tools = [Tool.model_validate({"type": "function", "function": {"name": "weather", "parameters": params}}),
             Tool.model_validate(TOOLS[0])]
    plan = ToolPlan.of(tools, "required", False, None)
    prompt = _chat(llm, "What is the weather in Oslo?")
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0, structured=plan.structured()))
    assert out.outputs[0].finish_reason == "stop", out.text
    calls, _ = plan.calls(out.text)
    schemas = {"weather": params, "book_room": TOOLS[0]["function"]["parameters"]}
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    with pytest.raises(InvalidParamError, match="tool_choice must be"):
        ToolPlan.of(tools, {"type": "function", "function": "weather"}, True, None)
    with pytest.raises(InvalidParamError, match="invalid grammar"):  # (gbnf_to_lark's own error: was a 500)
        llm.generate([1, 2], SamplingParams(structured=StructuredOutputs(grammar="root ::= undefined_rule")))
