"""Property-based: a real ``chunkattn serve`` process answers any request body as the API says, never with a 500.

Hypothesis writes /v1/completions and /v1/chat/completions bodies field by field: each known field absent, a
plausible value, an edge value (0, negative, huge, empty) or a value of the wrong type (null, bool, string, list,
object, float for an int), plus unknown fields; chat messages of any role and content shape, tools and tool
choices, response formats with small schemas; streamed or not. Every answer must be a 200 in the response's shape
(choices with a finish reason and usage, or an SSE stream of JSON chunks ending in ``[DONE]``), or a 4xx whose
body is an OpenAI error object; the server stays healthy and idle after each (nothing left running or holding
K/V). Half the bodies are a correct client's (every value in range), so that the 200 paths get their share. The
server is the tests' small random-weight model with SmolLM2's tokenizer, on a loopback port. 1500 examples
(CHUNKATTN_FUZZ_EXAMPLES=1500, ~11 minutes) found no 500 when this was written.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chunkattn.model import default_model_path
from server_helpers import TINY_CONFIG, ServerProcess

KEY = "sk-fuzz"
FINISH = {"stop", "length", "tool_calls", "abort", "error"}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(str(TINY_CONFIG), "--random-weights", "--tokenizer", str(default_model_path()),
                      "--served-model-name", "tiny", "--kv-cache-tokens", "4096", "--chunk-size", "16",
                      "--max-body-bytes", "100000", api_key=KEY)
    yield s
    s.stop()


def junk() -> st.SearchStrategy:
    """A value of any JSON type: what a buggy client sends where it should not."""
    return st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=8),
                     st.lists(st.integers(-2, 5), max_size=3), st.just({"a": 1}))


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: mostly plausible, sometimes junk (absent is decided by the caller)."""
    return st.one_of(plausible, plausible, plausible, junk())


SMALL_INT = st.one_of(st.integers(-2, 6), st.sampled_from([0, 2**31, 10**9, -10**9]))
PROB = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1.5, -0.1]))
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
SCHEMA = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "string", "maxLength": 5},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {"type": "nonsense"},
    {"enum": ["x", "y"]},
])
RESPONSE_FORMAT = st.one_of(
    st.just({"type": "text"}), st.just({"type": "json_object"}),
    st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}, SCHEMA),
    st.just({"type": "json_schema"}), st.just({"type": "xml"}), junk())

SAMPLING = {
    "max_tokens": field(SMALL_INT),
    "temperature": field(st.one_of(st.floats(0, 2), st.sampled_from([-1.0, 2.5]))),
    "top_p": field(PROB),
    "top_k": field(SMALL_INT),
    "min_p": field(PROB),
    "n": field(st.integers(-1, 3)),
    "seed": field(st.one_of(st.integers(-2**63, 2**64 - 1), st.just(2**64))),
    "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=3))),
    "stop_token_ids": field(st.lists(st.integers(-1, 60000), max_size=3)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "repetition_penalty": field(st.floats(-1, 11)),
    "logit_bias": field(st.dictionaries(st.sampled_from(["5", "17", "x", "-3", "999999"]), st.floats(-150, 150),
                                        max_size=2)),
    "min_tokens": field(SMALL_INT),
    "ignore_eos": field(st.booleans()),
    "include_stop_str_in_output": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "user": field(TEXT),
    "cache_salt": field(st.sampled_from(["", "t1", "t" * 300])),
    "model": field(st.sampled_from(["tiny", "gpt-4"])),
    "response_format": RESPONSE_FORMAT,
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                               "continuous_usage_stats": st.booleans()})),
    "unknown_field": junk(),
}
COMPLETION = {
    **SAMPLING,
    "prompt": field(st.one_of(TEXT, st.lists(TEXT, min_size=0, max_size=3), st.lists(st.integers(-1, 49200),
                                                                                     max_size=6),
                              st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=2))),
    "echo": field(st.booleans()),
    "logprobs": field(SMALL_INT),
    "suffix": field(TEXT),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"])},
    optional={"content": st.one_of(TEXT, st.none(), st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})}), junk()),
        max_size=2), junk()),
        "name": TEXT, "tool_call_id": TEXT})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "bad name!", ""])},
    optional={"description": TEXT, "parameters": SCHEMA})})
CHAT = {
    **SAMPLING,
    "messages": field(st.lists(MESSAGE, max_size=3)),
    "max_completion_tokens": field(SMALL_INT),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(SMALL_INT),
    "tools": field(st.lists(TOOL, max_size=2)),
    "tool_choice": field(st.one_of(st.sampled_from(["none", "auto", "required", "any"]), st.just(
        {"type": "function", "function": {"name": "get_weather"}}))),
}


# bodies a correct client sends: every value in range (the answer must be a 200, or a 4xx for what only the
# server can judge: a prompt past the context, a schema it cannot compile, a tool choice naming no tool)
VALID_SAMPLING = {
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(0, 2**32),
    "stop": st.one_of(TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 49000), max_size=3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 10), "logit_bias": st.dictionaries(st.sampled_from(["5", "17", "300"]),
                                                                           st.floats(-100, 100), max_size=2),
    "min_tokens": st.integers(0, 3), "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(), "user": TEXT, "cache_salt": st.sampled_from(["t1", "t2"]),
    "model": st.just("tiny"), "response_format": st.one_of(st.just({"type": "text"}), st.just({"type": "json_object"}),
                                                           st.builds(lambda s: {"type": "json_schema", "json_schema": {
                                                               "name": "s", "schema": s}}, SCHEMA)),
}
VALID_COMPLETION = {
    **VALID_SAMPLING,
    "prompt": st.one_of(TEXT.filter(str.strip), st.lists(TEXT.filter(str.strip), min_size=1, max_size=3),
                        st.lists(st.integers(0, 49000), min_size=1, max_size=6)),
    "echo": st.booleans(), "logprobs": st.integers(0, 5),
}
VALID_CHAT = {
    **VALID_SAMPLING,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": TEXT}), min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required"]),
}


def body_of(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    # a bounded output: most bodies ask for a few tokens (the fuzz is about shapes, not long generations)
    return st.fixed_dictionaries({}, optional=fields).map(
        lambda b: {**b, "max_tokens": 4} if isinstance(b.get("max_tokens"), int) and b["max_tokens"] > 64 and
        not isinstance(b["max_tokens"], bool) and b["max_tokens"] < 10**6 else b)


def check_error(r: httpx.Response) -> None:
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str), err


def check_ok(route: str, body: dict, r: httpx.Response) -> None:
    if body.get("stream") is True:
        lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", r.text[-500:]
        for ln in lines[:-1]:
            chunk = json.loads(ln[6:])
            assert "choices" in chunk or "error" in chunk, chunk
        return
    data = r.json()
    assert data["choices"], data
    for c in data["choices"]:
        assert c["finish_reason"] in FINISH, c
        if route.endswith("chat/completions"):
            assert c["message"]["role"] == "assistant"
        else:
            assert isinstance(c["text"], str)
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["chunkattn:num_requests_running"] == 0 and m["chunkattn:num_requests_waiting"] == 0
                and m["chunkattn:kv_cache_live_chunks"] == 0):
            return
        assert time.monotonic() < deadline, f"the server did not drain: {m}"
        time.sleep(0.05)


EXAMPLES = int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "40"))  # ~0.4 s each


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(chat=st.booleans(), data=st.data(), stream=st.sampled_from([None, True, False, "yes"]))
def test_any_body_gets_a_response_or_a_4xx_never_a_500(server, chat, data, stream):
    route = "/v1/chat/completions" if chat else "/v1/completions"
    clean = data.draw(st.booleans(), label="a correct client")
    fields = (VALID_CHAT if chat else VALID_COMPLETION) if clean else (CHAT if chat else COMPLETION)
    body = data.draw(body_of(fields), label="body")
    if clean:  # the fields the API requires
        body.setdefault("messages" if chat else "prompt", [{"role": "user", "content": "hi"}] if chat else "hi")
    if stream is not None and not (clean and stream == "yes"):
        body["stream"] = stream
    r = httpx.post(server.url + route, json=body, headers=server.headers, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text[:1000], body)
    event(f"{'clean' if clean else 'messy'} {route} {r.status_code}{' stream' if body.get('stream') is True else ''}")
    if r.status_code >= 400:
        check_error(r)
    else:
        check_ok(route, body, r)
    wait_idle(server)


def test_the_server_is_still_healthy_and_answers(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, headers=server.headers,
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in server.output(whole=True)
