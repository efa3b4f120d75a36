"""``chunkattn serve`` driven by real clients: a uvicorn process on 127.0.0.1, the official ``openai``
package (sync and async), raw HTTP for what the client hides (framing, errors, disconnects)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from chunkattn.model import default_model_path
from server_helpers import TINY_CONFIG, ServerProcess, metrics

KEY = "sk-test-key"
SMOLLM2_SHAPE = Path(__file__).parents[1] / "benchmarks" / "configs" / "smollm2-135m.json"
MAX_BODY = 200_000
KV_TOKENS = 8192


@pytest.fixture(scope="module")
def tiny():
    """A small random-weight model with SmolLM2's tokenizer (fast; text in and out)."""
    server = ServerProcess(str(TINY_CONFIG), "--random-weights", "--tokenizer", str(default_model_path()),
                           "--served-model-name", "tiny", "--kv-cache-tokens", str(KV_TOKENS), "--chunk-size", "16",
                           "--max-body-bytes", str(MAX_BODY), api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny):
    with openai.OpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once nothing runs or waits and no chunk is live (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["chunkattn:num_requests_running"] == 0 and m["chunkattn:num_requests_waiting"] == 0
                and m["chunkattn:kv_cache_live_chunks"] == 0):
            return m
        assert time.monotonic() < deadline, f"the server did not drain: {m}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- basics
def test_open_routes_and_auth(tiny):
    assert httpx.get(tiny.url + "/health").status_code == 200
    version = httpx.get(tiny.url + "/version").json()
    assert version["version"] and version["system"]["cpu"]["model"]
    assert set(version["system"]["paths"]) == {"attention", "linear float32", "linear bfloat16", "linear quantized",
                                               "elementwise", "layer loop"}
    assert "chunkattn:kv_cache_usage_perc" in httpx.get(tiny.url + "/metrics").text
    r = httpx.get(tiny.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(tiny.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    models = httpx.get(tiny.url + "/v1/models", headers=tiny.headers).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 2048


def test_completion_and_usage(client):
    r = client.completions.create(model="tiny", prompt="Hello there, general", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    # (the last prompt token is always computed: its logits give the first output token)
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens - 1
    again = client.completions.create(model="tiny", prompt="Hello there, general", max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prompt was cached by the first request


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model="tiny", prompt=[5, 6, 7], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_stream_matches_non_stream(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.choices for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stream_framing_and_first_chunk(tiny):
    body = {"prompt": "abc", "max_tokens": 5, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, headers=tiny.headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    assert "\r" not in raw and raw.endswith("data: [DONE]\n\n")
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    payloads = [json.loads(f[6:]) for f in frames[:-1]]
    assert "usage" not in payloads[0]  # no include_usage: no usage field, every chunk has choices[0]
    tokens = sum(1 for _ in payloads)
    assert tokens >= 1 and all(p["choices"] for p in payloads)


def test_chat_stream_and_logprobs(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.message.role == "assistant" and r.usage.completion_tokens == 6
    assert len(c.logprobs.content) == 6
    for item in c.logprobs.content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # greedy: the sampled token is the top one
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=6,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content


def test_n_stop_echo_and_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt=["one two", "three"], n=3, max_tokens=5, temperature=1.0,
                                  seed=7, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == list(range(6)) and r.usage.completion_tokens == 30
    r2 = client.completions.create(model="tiny", prompt=["one two", "three"], n=3, max_tokens=5, temperature=1.0,
                                   seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(r2.choices, key=lambda c: c.index)]  # seeded
    base = client.completions.create(model="tiny", prompt="Count: 1, 2,", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[2:5]
    if stop.strip():
        s = client.completions.create(model="tiny", prompt="Count: 1, 2,", max_tokens=10, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True}).choices[0]
        assert s.finish_reason == "stop" and stop not in s.text and base.startswith(s.text)
    e = client.completions.create(model="tiny", prompt="Count: 1, 2,", max_tokens=2, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    assert e.text.startswith("Count: 1, 2,")
    lp = e.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == e.text


def test_cache_salt_isolates_tenants(client):
    prompt = "Tenant secret: " + " ".join(str(random.randrange(10**6)) for _ in range(40))

    def cached(salt):
        extra = {"ignore_eos": True, **({"cache_salt": salt} if salt else {})}
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("alice") == 0
    assert cached("alice") > 0  # the same tenant hits its own prefix
    assert cached("bob") == 0  # another tenant does not see it
    assert cached(None) == 0  # nor does the common pool
    assert cached(None) > 0


async def _async_client_run(url: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        async def one(i: int) -> str:
            stream = await c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4,
                stream=True, temperature=0, extra_body={"ignore_eos": True})
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        return await asyncio.gather(*(one(i) for i in range(8)))


def test_async_client_concurrent(tiny):
    texts = asyncio.run(_async_client_run(tiny.url))
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)


def test_tokenizer_routes(tiny):
    h = tiny.headers
    t = httpx.post(tiny.url + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    assert httpx.post(tiny.url + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()["prompt"] == \
        "Hello world"
    info = httpx.get(tiny.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] and info["chat_template"]
    chat = httpx.post(tiny.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=h)
    assert chat.status_code == 200 and chat.json()["count"] > 2
    assert httpx.post(tiny.url + "/reset_prefix_cache", headers=h).json()["freed_chunks"] >= 0


# ---------------------------------------------------------------------------------------------- errors
ANY = object()  # any param
BAD_INPUTS = [
    # (body or raw bytes, status, words the message must contain, the error's param); docs/serving.md lists them
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "2048", "max_tokens"),
    ({"prompt": "x", "max_tokens": 2000, "n": 5}, 400, "K/V", "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n", "n"),
    ({"prompt": "x", "n": 10**6}, 400, "n", "n"),
    ({"prompt": ""}, 400, "empty", "prompt"),
    ({"prompt": []}, 400, "empty", "prompt"),
    ({"prompt": [[]]}, 400, "empty", "prompt"),
    ({"prompt": [-1]}, 400, "non-negative integers; prompt[0] is -1", "prompt"),
    ({"prompt": [1, -2]}, 400, "prompt[1] is -2", "prompt"),
    ({"prompt": [1.5]}, 400, "prompt[0] is 1.5", "prompt"),
    ({"prompt": [1, "a"]}, 400, "not a mix", "prompt"),
    ({"prompt": {"text": "x"}}, 400, "got dict", "prompt"),
    ({"prompt": ["x"] * 300}, 400, "at most 256 prompts", "prompt"),
    ({"prompt": [[1]] * 300}, 400, "at most 256 prompts", "prompt"),
    ({"prompt": [1, 2, 10**7]}, 400, "vocabulary", "prompt"),
    ({"prompt": list(range(2100))}, 400, "2048", "prompt"),
    (b'{"prompt": "a\\ud800b"}', 400, "lone UTF-16 surrogate", "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "x", "logprobs": 100}, 400, "logprobs", "logprobs"),
    ({"prompt": "x", "stop": [""]}, 400, "must not be empty", "stop"),
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "at most 16 stop strings", "stop"),
    ({"prompt": "x", "stop": [3]}, 400, "stop[0] is 3", "stop"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "outside the vocabulary", "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [10**8]}, 400, "outside the vocabulary", "stop_token_ids"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4", "model"),
    ({"max_tokens": 3}, 400, "prompt", "prompt"),
    ({"prompt": "x" * (MAX_BODY + 10)}, 413, "limit", None),
]


@pytest.mark.parametrize("body,status,words,param", BAD_INPUTS,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_then_good(tiny, body, status, words, param):
    kw = {"content": body, "headers": {**tiny.headers, "content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": tiny.headers}
    r = httpx.post(tiny.url + "/v1/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words.lower() in err["message"].lower(), err
    assert param is ANY or err["param"] == param, err
    good = httpx.post(tiny.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, headers=tiny.headers,
                      timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_bodies_that_are_not_json_say_so(tiny):
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(tiny.url + "/v1/completions", content=b"prompt=hi", timeout=30,
                       headers={**tiny.headers, "content-type": content_type})
        assert r.status_code == 400, r.text
        assert "Content-Type: application/json" in r.json()["error"]["message"] and content_type in r.text


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_chat_roles_accepted(tiny, role):
    messages = [{"role": role, "content": "hello"}]
    if role != "user":
        messages.append({"role": "user", "content": "and?"})
    r = httpx.post(tiny.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                   headers=tiny.headers, timeout=60)
    assert r.status_code == 200, r.text


def test_chat_unknown_role_and_bad_content_are_400(tiny):
    for messages, words in [([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
                            ([{"role": "user", "content": "a\ud800"}], "surrogate"),
                            ([{"content": "x"}], "role")]:
        body = json.dumps({"messages": messages, "max_tokens": 2}).encode()  # (escapes the lone surrogate)
        r = httpx.post(tiny.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={**tiny.headers, "content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "messages"


def test_bearer_scheme_is_case_insensitive(tiny):
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.get(tiny.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, (scheme, r.text)
    for value in (KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
        assert httpx.get(tiny.url + "/v1/models", headers={"Authorization": value}).status_code == 401, value


def test_errors_map_to_openai_exceptions(tiny, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    r = httpx.get(tiny.url + "/v1/no-such-route", headers=tiny.headers)
    assert r.status_code == 404 and "error" in r.json()


# ---------------------------------------------------------------------------------------------- disconnects
def test_disconnect_aborts_stream_and_plain_requests(tiny):
    _wait_idle(tiny)
    aborted_before = tiny.metrics().get('chunkattn:request_success_total{finished_reason="abort"}', 0)
    body = {"prompt": "a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, headers=tiny.headers, timeout=60) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")  # the first token arrived, then the client leaves
    # A plain (non-streaming) request whose client hangs up while it runs: raw HTTP on a socket closed once the
    # server reports the request running (a client-side timeout raced the generation on a fast machine).
    body = json.dumps({"prompt": "another long story", "max_tokens": 1500, "ignore_eos": True}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**tiny.headers, "Content-Type": "application/json",
                                                "Content-Length": str(len(body))}.items())
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while tiny.metrics()["chunkattn:num_requests_running"] < 1:
            assert time.monotonic() < deadline, "the plain request never started"
            time.sleep(0.02)
    m = _wait_idle(tiny, timeout=20)
    assert m['chunkattn:request_success_total{finished_reason="abort"}'] >= aborted_before + 2
    assert m["chunkattn:kv_cache_check_ok"] == 1
    log = tiny.output(whole=True)  # (it was "Exception in ASGI application ... InvalidStateError")
    assert "Traceback" not in log and "Exception" not in log, log


# ---------------------------------------------------------------------------------------------- load + faults
async def _load(url: str, headers: dict[str, str], num: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    systems = [f"System prompt {k}: " + " ".join(f"rule{k}-{j}" for j in range(60)) for k in range(3)]
    sem = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "left": 0, "5xx": 0, "wrong_tokens": 0, "other": 0}
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        tokens = rng.randint(4, 24)
        leave = rng.random() < 0.2
        stream = rng.random() < 0.5
        body = {"prompt": f"{rng.choice(systems)}\nQuestion {i}: why?", "max_tokens": tokens, "ignore_eos": True,
                "stream": stream, "temperature": rng.choice([0, 0.8]), "seed": i}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with sem:
            try:
                if stream:
                    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                        if r.status_code >= 500:
                            counts["5xx"] += 1
                            return
                        n = 0
                        usage = None
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            n += 1
                            if leave and n >= rng.randint(1, 3):
                                counts["left"] += 1
                                return  # closing the response drops the connection mid-stream
                            usage = json.loads(line[6:]).get("usage") or usage
                        # a chunk may carry several tokens when this client fell behind: count by usage
                        ok = usage is not None and usage["completion_tokens"] == tokens
                        counts["ok" if ok else "wrong_tokens"] += 1
                elif leave:
                    try:
                        await client.post(url + "/v1/completions", json=body, headers=headers,
                                          timeout=rng.uniform(0.01, 0.3))
                        counts["ok"] += 1  # finished before the client gave up
                    except httpx.TimeoutException:
                        counts["left"] += 1
                else:
                    r = await client.post(url + "/v1/completions", json=body, headers=headers)
                    if r.status_code >= 500:
                        counts["5xx"] += 1
                    elif r.status_code != 200:
                        counts["other"] += 1
                    elif r.json()["usage"]["completion_tokens"] != tokens:
                        counts["wrong_tokens"] += 1
                    else:
                        counts["ok"] += 1
            except httpx.HTTPError:
                counts["other"] += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(i, client) for i in range(num)))
    return counts


def test_load_with_disconnects(tiny):
    """Several hundred requests at concurrency 64 over a few shared system prompts, a fifth of the clients
    leaving at random points: no 5xx, every other request complete, nothing live after the drain."""
    counts = asyncio.run(_load(tiny.url, tiny.headers, num=300, concurrency=64, seed=3))
    assert counts["5xx"] == 0 and counts["wrong_tokens"] == 0 and counts["other"] == 0, counts
    assert counts["ok"] + counts["left"] == 300 and counts["left"] >= 20, counts
    m = _wait_idle(tiny, timeout=30)
    assert m["chunkattn:kv_cache_check_ok"] == 1 and m["chunkattn:engine_healthy"] == 1
    assert m["chunkattn:prefix_cache_hits_total"] > 0.5 * m["chunkattn:prefix_cache_queries_total"] > 0
    assert httpx.get(tiny.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- the real model
def test_smollm2_greedy_through_server_equals_llm_and_transformers():
    import torch

    from chunkattn import LLM, SamplingParams
    from chunkattn.model import load_model, to_transformers

    server = ServerProcess("--served-model-name", "smol")
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
            chat = c.chat.completions.create(model="smol", messages=[{"role": "user", "content":
                                             "What is the capital of France?"}], max_tokens=12, temperature=0)
            text = c.completions.create(model="smol", prompt="The quick brown fox", max_tokens=12, temperature=0)
            tokens = c.completions.create(model="smol", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                          logprobs=0)
    finally:
        server.stop()
    smol = load_model(None)
    llm = LLM(loaded=smol)
    chat_ids = llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    fox_ids = llm.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    outs = llm.generate([chat_ids, fox_ids], SamplingParams(max_tokens=12, temperature=0))
    assert chat.choices[0].message.content == outs[0].text and "Paris" in outs[0].text
    assert text.choices[0].text == outs[1].text
    assert chat.usage.completion_tokens == len(outs[0].token_ids)
    hf = to_transformers(smol)
    x = torch.tensor([fox_ids])
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[0, len(fox_ids):]
    assert outs[1].token_ids == ref.tolist()[: len(outs[1].token_ids)]
    assert "".join(tokens.choices[0].logprobs.tokens) == text.choices[0].text


# ---------------------------------------------------------------------------------------------- engine failure
async def _fail_mid_stream() -> tuple[str, int, int, int]:
    from chunkattn import LLM
    from chunkattn.server import Server, ServerConfig
    from helpers import tiny_model

    llm = LLM(loaded=tiny_model(), chunk_size=16)
    runner = llm.engine.runner
    calls = {"n": 0}
    real = runner.execute

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected device fault")
        return real(sched)

    runner.execute = flaky
    app = Server(llm, ServerConfig("t")).app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 20, "stream": True,
                                                  "ignore_eos": True})
        health = (await c.get("/health")).status_code
        after = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        metrics = await c.get("/metrics")
    assert "chunkattn:engine_healthy" in metrics.text
    return r.text, r.status_code, health, after.status_code


def test_engine_failure_mid_stream_is_an_error_frame_then_done():
    text, status, health, after = asyncio.run(_fail_mid_stream())
    frames = [f for f in text.split("\n\n") if f]
    assert status == 200 and frames[-1] == "data: [DONE]"
    err = json.loads(frames[-2][6:])["error"]
    assert "injected device fault" in err["message"] and err["code"] == 500
    tokens = [json.loads(f[6:]) for f in frames[:-2]]
    # tokens were streamed before the failure (how many frames carry them depends on how far the client lags:
    # the stream sends what is pending in one frame)
    assert tokens and all(t["choices"][0]["text"] is not None for t in tokens)
    assert health == 503 and after == 503  # the engine refuses new work, clearly


def test_continuous_usage_and_latency_histograms(client, tiny):
    chunks = list(client.completions.create(model="tiny", prompt="usage please", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True,
                                                                         "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 5 and chunks[-1].usage.completion_tokens == 5
    m = tiny.metrics()
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert m[f"chunkattn:{name}_count"] > 0, name
    assert m["chunkattn:generation_tokens_total"] > 0 and "chunkattn:kv_saved_bytes" in m


def test_a_slow_reader_gets_merged_chunks_and_n_finishes_once(tiny):
    """A client that reads late gets the tokens it missed merged into one chunk (the server holds one pending
    output per request, not one per step); with n > 1 each choice's finish_reason comes exactly once."""
    body = {"prompt": "slow reader", "max_tokens": 40, "n": 3, "stream": True, "ignore_eos": True,
            "logprobs": 1, "temperature": 0.7, "seed": 11, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, headers=tiny.headers, timeout=60) as r:
        time.sleep(1.0)  # the whole generation happens meanwhile
        frames = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [f for f in frames if f["choices"]]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    assert frames[-1]["usage"]["completion_tokens"] == 120
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        tokens = [t for c in mine for t in c["logprobs"]["tokens"]]
        offsets = [o for c in mine for o in c["logprobs"]["text_offset"]]
        assert len(tokens) == 40 and offsets == [sum(map(len, tokens[:k])) for k in range(40)]
    # (whether chunks were merged here depends on socket buffers; test_request_stream_merges_unread_outputs
    # checks the merging itself)


async def _unread_then_read() -> tuple[list, list]:
    from chunkattn import LLM, AsyncLLM, SamplingParams
    from helpers import tiny_model

    llm = LLM(loaded=tiny_model(), chunk_size=16)
    params = SamplingParams(max_tokens=12, n=2, temperature=0.8, seed=3, logprobs=1, ignore_eos=True)
    stream = AsyncLLM(llm).submit([1, 2, 3], params)
    while llm.engine.num_unfinished:  # the engine runs the whole request while nobody reads
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # let the event loop deliver every output
    unread = [out async for out in stream]
    return unread, llm.generate([[1, 2, 3]], params)


def test_request_stream_merges_unread_outputs():
    """Outputs nobody has read yet become one: its deltas are everything since the last read."""
    unread, (ref,) = asyncio.run(_unread_then_read())
    assert len(unread) == 1 and unread[0].finished
    for c, r in zip(unread[0].outputs, ref.outputs):
        assert c.delta_token_ids == c.token_ids == r.token_ids and len(c.token_ids) == 12
        assert c.delta_text == c.text == r.text
        assert [e.token_id for e in c.delta_logprobs] == c.token_ids


def test_unencodable_prompt_and_too_many_prompts_are_400(tiny):
    r = httpx.post(tiny.url + "/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
                   headers={**tiny.headers, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = httpx.post(tiny.url + "/v1/completions", json={"prompt": [[1]] * 300, "max_tokens": 1}, headers=tiny.headers)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(tiny.url + "/v1/completions", json={"prompt": [[1]] * 100, "n": 20, "max_tokens": 1},
                   headers=tiny.headers)
    assert r.status_code == 400 and "1024" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- shutdown
def _sse(url: str, body: dict, headers: dict, out: dict, name: str) -> None:
    """The data lines of a streamed request, into ``out[name]`` (an exception's repr if it broke)."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as r:
            lines.append(f"status {r.status_code}")
            lines += [line for line in r.iter_lines() if line]
    except httpx.HTTPError as exc:
        lines.append(f"broken: {exc!r}")
    out[name] = lines


def test_sigterm_drains_then_ends_the_rest_with_an_error_and_exits_0():
    """SIGTERM under load: /health 503 "draining" and new requests 503 at once; the requests that finish
    within --shutdown-timeout end normally; the rest get an error frame and [DONE] (a plain request: a 503
    JSON error); the process exits 0 with no traceback. /metrics needs --metrics-api-key, case-insensitive."""
    import signal
    import threading

    # SmolLM2's shape (random weights): ~20-40 ms a step here, so that 40 tokens surely fit in the grace period
    # and 1900 surely do not
    server = ServerProcess(str(SMOLLM2_SHAPE), "--random-weights", "--tokenizer", str(default_model_path()),
                           "--served-model-name", "tiny", "--kv-cache-tokens", "32768", "--chunk-size", "16",
                           "--shutdown-timeout", "4", "--metrics-api-key", "metrics-key", api_key=KEY)
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        r = httpx.get(server.url + "/metrics", headers={"Authorization": "bearer metrics-key"})
        assert r.status_code == 200 and "chunkattn:num_requests_running" in r.text
        assert httpx.get(server.url + "/health").status_code == 200
        out: dict = {}
        plain: dict = {}
        jobs = [("long", 1900, 3), ("short", 40, 3)]
        threads = [threading.Thread(target=_sse, args=(server.url, {"prompt": f"story {i}", "max_tokens": n,
                                                                    "ignore_eos": True, "stream": True},
                                                       server.headers, out, f"{kind}{i}"))
                   for kind, n, count in jobs for i in range(count)]

        def long_plain() -> None:
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1900, "ignore_eos": True},
                           headers=server.headers, timeout=120)
            plain["status"], plain["body"] = r.status_code, r.json()

        threads.append(threading.Thread(target=long_plain))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while metrics_with_key(server.url)["chunkattn:num_requests_running"] < 7:
            assert time.monotonic() < deadline, "the requests never all ran"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "draining" in health.json()["error"]["message"]
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2},
                          headers=server.headers)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) == 0, server.output()
        took = time.monotonic() - t0
        log = server.output(whole=True)
    finally:
        server.stop()
    for name, lines in out.items():
        assert lines[0] == "status 200" and lines[-1] == "data: [DONE]", (name, lines[-3:])
        chunks = [json.loads(line[6:]) for line in lines[1:-1]]
        if name.startswith("short"):  # finished within the grace period, normally
            assert chunks[-1]["choices"][0]["finish_reason"] == "length", (name, lines[-3:])
            assert "".join(c["choices"][0]["text"] for c in chunks)
        else:  # cut at the deadline: tokens, then an error frame
            assert "error" in chunks[-1] and chunks[-1]["error"]["code"] == 503, (name, lines[-3:])
            assert "shut down" in chunks[-1]["error"]["message"] and len(chunks) > 1
    assert plain["status"] == 503 and "shut down" in plain["body"]["error"]["message"]
    assert took < 15, took
    assert "Traceback" not in log and "terminate called" not in log and "CancelledError" not in log, log
    assert "ended 4 request(s)" in log, log  # (the server logs at warning here)


def metrics_with_key(url: str) -> dict[str, float]:
    return metrics(url, {"Authorization": "Bearer metrics-key"})


def test_a_port_in_use_is_an_error_exit():
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "chunkattn.cli", "serve", str(TINY_CONFIG), "--random-weights",
                               "--port", str(port), "--log-level", "warning"], capture_output=True, text=True,
                              timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "did not start" in proc.stderr, proc.stderr[-2000:]
