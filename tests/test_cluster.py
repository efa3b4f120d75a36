"""Engine replicas on Ray Serve (``chunkattn serve --replicas``): a real local Ray cluster started by the test,
driven over HTTP on 127.0.0.1 by the official ``openai`` client. Needs the ``cluster`` extra (Ray Serve)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (Ray Serve) is not installed")

from chunkattn.cluster.serve import ClusterConfig, EngineSpec, start_cluster, stop_cluster  # noqa: E402
from chunkattn.engine import LLM, SamplingParams  # noqa: E402
from chunkattn.model import default_model_path, load_model, load_tokenizer  # noqa: E402
from chunkattn.server import ServerConfig  # noqa: E402
from server_helpers import TINY_CONFIG, ServerProcess, free_port, metrics  # noqa: E402

KEY = "sk-cluster"
KV_TOKENS = 4096
CHUNK = 16


def _wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["chunkattn:num_requests_running"] == 0 and m["chunkattn:kv_cache_live_chunks"] == 0:
            return m
        assert time.monotonic() < deadline, f"the replicas did not drain: {m}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------- the command line
def test_cli_starts_replicas_and_stops_on_sigterm():
    """``chunkattn serve --replicas 2`` starts its own Ray cluster, serves, and on SIGTERM drains as one
    server does (/health and new requests 503, a stream still running at the deadline ends with an error
    frame and [DONE]), then shuts everything down and exits 0."""
    import threading

    template = Path(__file__).resolve().parent.parent / "examples" / "chat_templates" / "smollm2_tools.jinja"
    server = ServerProcess(str(TINY_CONFIG), "--random-weights", "--tokenizer", str(default_model_path()),
                           "--served-model-name", "tiny", "--kv-cache-tokens", "8192", "--replicas", "2",
                           "--router", "round-robin", "--replica-threads", "1", "--shutdown-timeout", "1",
                           "--chat-template", str(template), api_key=KEY, timeout=240)
    lines: list[str] = []
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            assert [m.id for m in c.models.list().data] == ["tiny"]
            r = c.completions.create(model="tiny", prompt=["one two", "three four"], max_tokens=4,
                                     extra_body={"ignore_eos": True})
            assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens == 8
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             tools=tools, tool_choice="auto", max_tokens=2)  # (400 without it)
            assert chat.choices[0].finish_reason in ("length", "stop", "tool_calls")
        info = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert info["chat_template"] == template.read_text()  # --chat-template reached the HTTP front
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # (the replicas answered)
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"prompt": "go", "max_tokens": 2000, "stream": True, "ignore_eos": True},
                              timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        server.proc.terminate()
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").status_code != 503:  # (the driver tells the ingress)
            assert time.monotonic() < deadline, "/health never said draining"
            time.sleep(0.05)
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert late.status_code == 503, late.text
        reader.join(60)
    finally:
        server.proc.terminate()
        assert server.proc.wait(90) == 0, server.output()
    assert lines[-1] == "data: [DONE]" and "shut down" in lines[-2], lines[-3:]


def _replica_counts(url: str) -> dict[str, float]:
    return {k.split('replica="')[1].rstrip('"}'): v for k, v in metrics(url).items()
            if k.startswith("chunkattn:replica_requests_total{")}


def test_a_removed_node_is_routed_around_and_replaced():
    """Two nodes with one replica each (``ray.cluster_utils.Cluster``): remove one node and every request
    still completes, once, on the other replica; add a node and Ray's replacement replica takes requests."""
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = EngineSpec(model=str(TINY_CONFIG), random_weights=True, kv_cache_tokens=2048, chunk_size=CHUNK, threads=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        start_cluster(spec, ClusterConfig(replicas=2, replica_cpus=1, stats_period_s=0.5), ServerConfig("tiny"),
                      port=port)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def ask(n: int, offset: int) -> list[int]:
            return [client.completions.create(model="tiny", prompt=[[1000 + i, 2000 + i]], max_tokens=3,
                                              extra_body={"ignore_eos": True}).usage.completion_tokens
                    for i in range(offset, offset + n)]

        assert ask(6, 0) == [3] * 6
        before = _replica_counts(url)
        assert len(before) == 2 and sum(before.values()) == 6, before
        cluster.remove_node(nodes[0])
        assert ask(10, 100) == [3] * 10
        after = _replica_counts(url)
        if set(after) <= set(before) and sum(after.values()) == 16:  # the same ingress counted before and after
            grew = sorted(after[k] - before[k] for k in before)
        else:  # the ingress was on the removed node: Ray restarted it, and its counts with it
            assert sum(after.values()) == 10 and set(after) < set(before), (before, after)
            grew = sorted([0, *after.values()])
        assert grew == [0, 10], (before, after)  # one replica gone, the other answered all, each once
        cluster.add_node(num_cpus=1)
        deadline = time.monotonic() + 120
        transient: list[str] = []
        while True:  # until a new replica answers (an id not seen before)
            try:
                if set(_replica_counts(url)) - set(before):
                    break
                assert ask(2, 200) == [3, 3]
            except (httpx.HTTPStatusError, openai.APIStatusError) as e:
                # Ray Serve's proxy answers 404 ("... for available routes.") for a moment while the application
                # is redeployed onto the new node (seen once in CI at 59ebd61); anything else fails the test
                transient.append(f"{type(e).__name__}: {e}"[:200])
            assert time.monotonic() < deadline, f"no replacement replica: {serve.status()}; errors: {transient}"
            time.sleep(0.5)
    finally:
        stop_cluster()
        cluster.shutdown()


# ------------------------------------------------------------------------------------- one cluster, many tests
@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    spec = EngineSpec(model=str(TINY_CONFIG), random_weights=True, tokenizer=str(default_model_path()),
                      kv_cache_tokens=KV_TOKENS, chunk_size=CHUNK, threads=1)
    try:
        start_cluster(spec, ClusterConfig(replicas=2, stats_period_s=0.5), ServerConfig("tiny", api_key=KEY),
                      port=port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_cluster()


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local():
    """The same random weights in this process: what every replica must answer."""
    loaded = load_model(TINY_CONFIG, random_weights=True)
    loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(default_model_path()))
    return LLM(loaded=loaded, kv_cache_tokens=KV_TOKENS, chunk_size=CHUNK)


def test_outputs_equal_one_engine(client, local):
    """Greedy text through the cluster (plain, several prompts in one request, streamed chat, logprobs with
    echo) equals the local engine's."""
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.text for o in local.generate(prompts, greedy)]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert r.usage.completion_tokens == 30

    messages = [{"role": "user", "content": "Say something."}]
    ids = local.apply_chat_template(messages)
    chat_want = local.generate([ids], greedy)[0].text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat_want

    lp = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=3, temperature=0, logprobs=2,
                                   echo=True, extra_body={"ignore_eos": True})
    out = local.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2,
                                                    prompt_logprobs=2))[0]
    got = lp.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(out.prompt_token_ids) + 3
    expect = [e.logprob for e in out.prompt_logprobs[1:]] + [e.logprob for e in out.outputs[0].logprobs]
    assert got[1:] == pytest.approx(expect, abs=1e-4)


def test_requests_follow_their_prefix(client, cluster):
    """Two system prompts, several questions each, one at a time: after its first request, every request
    finds its whole system prompt cached (the router sent it to the replica holding it), including after the
    replicas' reports replaced the router's estimates."""
    rng = random.Random(7)
    systems = [[rng.randrange(1000, 40000) for _ in range(6 * CHUNK)] for _ in range(2)]
    cached = []
    for i in range(8):
        system = systems[i % 2]
        question = [rng.randrange(1000, 40000) for _ in range(5)]
        r = client.completions.create(model="tiny", prompt=system + question, max_tokens=2,
                                      extra_body={"ignore_eos": True})
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        if i == 3:
            time.sleep(1.5)  # a few reports (every 0.5 s) replace the estimates
    assert all(c >= len(systems[0]) for c in cached[2:]), cached


def test_errors_and_auth_as_one_server(client, cluster):
    assert httpx.get(cluster + "/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[[1, 2, 10**6]], max_tokens=2)
    # checked by the replica's engine, not the ingress: still a 400 (it was a 500 "the replica raised")
    with pytest.raises(openai.BadRequestError, match="logit_bias: token id 99999999 is outside the vocabulary"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, logit_bias={"99999999": 1})
    with httpx.stream("POST", cluster + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"prompt": "hi", "max_tokens": 2, "stream": True, "logit_bias": {"99999999": 1}}) as r:
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]" and '"code": 400' in frames[-2] and "logit_bias" in frames[-2], frames
    assert httpx.get(cluster + "/health").status_code == 200
    assert httpx.get(cluster + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert client.completions.create(model="tiny", prompt="fine", max_tokens=2).usage.completion_tokens >= 1


def test_concurrent_requests_none_lost_or_duplicated(cluster):
    """40 concurrent streams over both replicas: each gets its own tokens exactly once, all complete, and the
    replicas' finish counters add up to the requests sent."""
    before = metrics(cluster)['chunkattn:request_success_total{finished_reason="length"}']

    async def main() -> list[tuple[str, int, str]]:
        async with openai.AsyncOpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            async def one(i: int) -> tuple[str, int, str]:
                stream = await c.completions.create(model="tiny", prompt=f"request number {i}:", max_tokens=8,
                                                    stream=True, extra_body={"ignore_eos": True})
                ids, text, n = set(), "", 0
                async for ch in stream:
                    ids.add(ch.id)
                    for choice in ch.choices:
                        text += choice.text
                        n += 1 if choice.text or choice.finish_reason is None else 0
                assert len(ids) == 1
                return ids.pop(), n, text
            return await asyncio.gather(*(one(i) for i in range(40)))

    results = asyncio.run(main())
    assert len({rid for rid, _, _ in results}) == 40
    m = _wait_idle(cluster)
    assert m['chunkattn:request_success_total{finished_reason="length"}'] - before == 40
    assert m["chunkattn:kv_cache_check_ok"] == 1


def test_disconnect_aborts_on_the_replica(cluster):
    with httpx.stream("POST", cluster + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "go on and on", "max_tokens": 2000, "stream": True,
                            "ignore_eos": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    before = time.monotonic()
    m = _wait_idle(cluster)
    assert time.monotonic() - before < 30
    assert m['chunkattn:request_success_total{finished_reason="abort"}'] >= 1


def _engine_replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "#engine#" in a["name"]]


def test_dead_replica_is_routed_around(cluster):
    """Kill a replica while requests stream from both: requests on it end with an error frame (nothing
    hangs), the others finish; new requests all succeed (routed to the survivor, or retried there when their
    replica died before answering) while Ray replaces the dead one."""
    names = _engine_replica_actors()
    assert len(names) == 2

    started: list[int] = []

    async def stream_one(c: openai.AsyncOpenAI, i: int, max_tokens: int) -> str:
        try:
            stream = await c.completions.create(model="tiny", prompt=f"long story {i}:", max_tokens=max_tokens,
                                                stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                if i not in started:
                    started.append(i)
            return "ok"
        except openai.APIError as exc:
            return f"error: {exc}"

    async def main() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            running = [asyncio.ensure_future(stream_one(c, i, 1900)) for i in range(6)]
            while len(started) < len(running):
                await asyncio.sleep(0.05)
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            after = await asyncio.gather(*(stream_one(c, 100 + i, 4) for i in range(10)))
            return list(await asyncio.gather(*running)), list(after)

    during, after = asyncio.run(asyncio.wait_for(main(), 150))
    assert after == ["ok"] * 10, after
    failed = [d for d in during if d != "ok"]
    assert 0 < len(failed) < len(during), during
    assert all("replica" in f for f in failed), failed
    deadline = time.monotonic() + 90
    while len(_engine_replica_actors()) < 2 or names[0] in _engine_replica_actors():
        assert time.monotonic() < deadline, "Ray did not replace the dead replica"
        time.sleep(1)


def test_a_request_cancelled_while_routed_leaves_no_load():
    """Ray Serve's router may hold a request (no replica has room) and the client leave before it is routed:
    Ray then never calls on_request_routed / on_request_completed, so the load counted when the replica was
    chosen must be undone when the routing future is cancelled (it drifted up before)."""
    import types

    from chunkattn.cluster.ray_router import PrefixRouter

    router = object.__new__(PrefixRouter)  # (its Ray-side state is not needed for these hooks)
    router.initialize_state(policy="prefix-aware", block_size=4, capacity_tokens=1024)
    router.core.add_replica("r1", 1024)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def pending(key: str) -> types.SimpleNamespace:
            return types.SimpleNamespace(future=loop.create_future(),
                                         metadata=types.SimpleNamespace(internal_request_id=key))

        left, served = pending("left"), pending("served")
        for p in (left, served):
            router.core.record("r1", [1, 2])
            router._sent[p.metadata.internal_request_id] = "r1"
            router._watch(p.metadata.internal_request_id, p)
        assert router.core.replicas["r1"].inflight == 2
        left.future.cancel()  # the client left while the request waited for a replica
        served.future.set_result("r1")  # routed: its load stays until it completes
        await asyncio.sleep(0)
        assert router.core.replicas["r1"].inflight == 1 and set(router._sent) == {"served"}
        router.on_request_completed(types.SimpleNamespace(unique_id="r1"), "served")
        assert router.core.replicas["r1"].inflight == 0 and not router._sent and not router._routing

    asyncio.run(main())
