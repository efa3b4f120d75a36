"""The serving-ready engine API: abort in every state, request ids, the inbox under concurrent threads,
failed steps, delta outputs, logprobs, prompt logprobs, timestamps, min_tokens, seeds, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from chunkattn import LLM, AsyncLLM, SamplingParams
from chunkattn.engine import EngineDeadError, RequestOutput
from chunkattn.model import LoadedModel, to_transformers
from helpers import tiny_model

VOCAB = 101
EOS = 100


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(VOCAB, eos=EOS)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, EOS, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drive(engine, until, limit: int = 500) -> list[RequestOutput]:
    """Step the engine directly (no loop thread) until ``until(outputs)``; returns every output seen."""
    seen: list[RequestOutput] = []
    for _ in range(limit):
        seen += engine.step()
        if until(seen):
            return seen
    raise AssertionError("the condition never held")


def final(outputs: list[RequestOutput], rid: str) -> RequestOutput:
    [out] = [o for o in outputs if o.request_id == rid and o.finished]
    return out


def assert_no_leak(engine) -> None:
    engine.cache.check()
    assert engine.cache.stats()["used_chunks"] == 0
    assert engine.cache.stats()["num_sequences"] == 0
    assert not engine.scheduler.has_work and engine.num_unfinished == 0


# ---------------------------------------------------------------------------- abort
def test_abort_in_every_state_releases_everything_and_is_idempotent(tiny):
    # arrival order puts each request below in its state (cache-aware admission would take the short ones first)
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=8 * 40, max_num_batched_tokens=16, max_num_seqs=3,
              scheduling_policy="fcfs")
    engine = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=30, temperature=0.8, n=2, seed=1, ignore_eos=True)
    inbox = engine.add_request(prompt(10, 1), params)  # aborted before any step drains it
    engine.abort(inbox)
    out = final(engine.step(), inbox)
    assert out.outputs[0].finish_reason == "abort" and out.token_ids == []

    decode = engine.add_request(prompt(12, 3), long)  # forks into two sequences at its first token
    prefill = engine.add_request(prompt(60, 2), params)  # 60 tokens at 16 per step: several prefill steps
    waiting = engine.add_request(prompt(9, 4), params)  # max_num_seqs=3: waits behind the two above
    seen = drive(engine, lambda s: any(o.request_id == decode and o.token_ids for o in s))
    r_prefill = engine._requests[prefill]
    assert r_prefill.prompt_seq is not None and 0 < r_prefill.prompt_seq.num_tokens < 60
    assert engine._requests[waiting] in engine.scheduler.waiting
    for rid in (prefill, decode, waiting):
        engine.abort(rid)
    engine.abort(decode)  # twice
    engine.abort("no-such-request")
    outs = engine.step()
    for rid in (prefill, decode, waiting):
        out = final(outs, rid)
        assert {c.finish_reason for c in out.outputs} == {"abort"}
    assert len([o for o in outs if o.finished]) == 3
    assert_no_leak(engine)
    assert engine.step() == []
    del seen


def test_abort_a_preempted_request(tiny):
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=8 * 14, max_num_batched_tokens=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = [engine.add_request(prompt(20, 10 + i), params) for i in range(4)]

    def preempted(_):
        return any(r.num_preemptions and r in engine.scheduler.waiting for r in engine._requests.values())

    drive(engine, preempted)
    victim = next(r for r in engine._requests.values() if r.num_preemptions and r in engine.scheduler.waiting)
    engine.abort(victim.request_id)
    outs = drive(engine, lambda s: sum(o.finished for o in s) == 4)
    assert final(outs, victim.request_id).outputs[0].finish_reason == "abort"
    assert all(final(outs, i).outputs[0].finish_reason == "length" for i in ids if i != victim.request_id)
    assert_no_leak(engine)


def test_request_ids_are_unique_while_in_use(tiny):
    engine = LLM(loaded=tiny, chunk_size=8).engine
    p = SamplingParams(max_tokens=2, temperature=0)
    assert engine.add_request(prompt(5), p, request_id="a") == "a"
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompt(5), p, request_id="a")
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_requests([(prompt(5), p, "b"), (prompt(5), p, "b")])
    drive(engine, lambda s: any(o.finished for o in s))
    assert engine.add_request(prompt(5), p, request_id="a") == "a"  # free again once finished


# ---------------------------------------------------------------------------- the loop and the inbox
def test_inbox_under_concurrent_threads_delivers_every_request_exactly_once(tiny):
    llm = LLM(loaded=tiny, chunk_size=8, max_num_seqs=8)
    finals: dict[str, list[RequestOutput]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def sink(out: RequestOutput) -> None:
        if out.finished:
            with lock:
                finals.setdefault(out.request_id, []).append(out)

    def client(k: int) -> None:
        try:
            for i in range(6):
                rid = llm.loop.submit(prompt(5 + (k * 7 + i) % 23, k * 100 + i),
                                      SamplingParams(max_tokens=3 + i, temperature=0, ignore_eos=True), sink,
                                      f"t{k}-{i}")
                if i % 3 == 1:
                    llm.loop.abort(rid)
                time.sleep(0.001 * (k % 3))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    deadline = time.time() + 120
    while len(finals) < 48 and time.time() < deadline:
        time.sleep(0.01)
    assert not errors
    assert len(finals) == 48 and all(len(v) == 1 for v in finals.values())
    reasons = {rid: v[0].outputs[0].finish_reason for rid, v in finals.items()}
    assert set(reasons.values()) <= {"length", "abort"}
    assert all(reasons[f"t{k}-{i}"] == "length" for k in range(8) for i in range(6) if i % 3 != 1)
    assert llm.loop.call(lambda: llm.engine.cache.stats()["used_chunks"]).result(timeout=30) == 0
    assert llm.loop.sink_errors == 0


def test_a_failing_step_fails_every_request_marks_the_engine_unhealthy_and_nothing_hangs(tiny, monkeypatch):
    llm = LLM(loaded=tiny, chunk_size=8)
    calls = {"n": 0}
    real = llm.engine.runner.execute

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real(step)

    monkeypatch.setattr(llm.engine.runner, "execute", flaky)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(llm.generate(
        [prompt(9, i) for i in range(4)], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "generate hung after a failed step"
    outs = result[0]
    assert all(o.finished and o.outputs[0].finish_reason == "error" for o in outs)
    assert all("simulated device failure" in (o.error or "") for o in outs)
    assert not llm.engine.is_healthy
    with pytest.raises(EngineDeadError, match="simulated"):
        llm.generate(prompt(5), SamplingParams(max_tokens=2))


def test_a_tokenizer_failing_on_one_prompt_fails_that_request_only(tiny):
    """The detokenizer of a request is made when it leaves the inbox (the engine's thread): a tokenizer that
    raises there fails that request with the reason, and the engine and the other requests go on."""

    class Picky:  # a slow-tokenizer stand-in that cannot decode token 99
        is_fast = False

        def decode(self, ids, skip_special_tokens=True):
            if 99 in ids:
                raise ValueError("token 99 has no text")
            return "".join(chr(65 + t % 26) for t in ids)

    llm = LLM(loaded=tiny, chunk_size=8)
    llm.engine._detok_tokenizer = Picky()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    bad, good = llm.generate([[5, 6, 99], [5, 6, 7]], greedy)
    assert bad.outputs[0].finish_reason == "error" and "token 99 has no text" in (bad.error or "")
    assert good.outputs[0].finish_reason == "length" and len(good.outputs[0].text) == 4
    assert llm.engine.is_healthy and llm.engine.num_unfinished == 0
    assert llm.generate([[1, 2, 3]], greedy)[0].outputs[0].finish_reason == "length"


def test_stream_closed_early_aborts_and_frees(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    stream = llm.stream(prompt(30), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    first = next(stream)
    assert not first.finished and first.token_ids
    stream.close()
    deadline = time.time() + 30
    while llm.engine.num_unfinished and time.time() < deadline:
        time.sleep(0.01)
    assert llm.loop.call(lambda: llm.engine.cache.stats()["used_chunks"]).result(timeout=30) == 0
    assert llm.engine.stats.finished.get("abort") == 1


def test_async_cancellation_aborts_the_request(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    alm = AsyncLLM(llm)

    async def consume() -> int:
        n = 0
        async for out in alm.generate(prompt(20), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)):
            n = len(out.token_ids)
        return n

    async def main() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.time() + 30
    while llm.engine.num_unfinished and time.time() < deadline:
        time.sleep(0.01)
    assert llm.engine.num_unfinished == 0 and llm.engine.stats.finished.get("abort") == 1


# ---------------------------------------------------------------------------- outputs
def test_delta_outputs_add_up_and_timestamps_are_ordered(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    t_before = time.time()
    outs = list(llm.stream(prompt(13), SamplingParams(max_tokens=9, temperature=0.9, seed=3, n=2,
                                                      ignore_eos=True)))
    last = outs[-1]
    assert last.finished and not any(o.finished for o in outs[:-1])
    for i in range(2):
        deltas = [t for o in outs for t in o.outputs[i].delta_token_ids]
        assert deltas == last.outputs[i].token_ids and len(deltas) == 9
    m = last.metrics
    assert t_before - 1 <= m.created <= time.time() + 1
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finish_time
    assert m.queue_time is not None and m.queue_time >= 0 and m.ttft is not None and m.tpot is not None
    for c in last.outputs:
        assert len(c.token_times) == 9 and c.token_times == sorted(c.token_times)
    assert m.num_output_tokens == 18


def test_logprobs_match_transformers(tiny):
    hf = to_transformers(tiny)
    llm = LLM(loaded=tiny, chunk_size=8)
    p = prompt(17, 5)
    out = llm.generate(p, SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2,
                                         ignore_eos=True))[0]
    seq = p + out.token_ids
    ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1)  # [len, V]
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 6
    for i, entry in enumerate(lps):
        row = ref[len(p) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    pl = out.prompt_logprobs
    assert pl is not None and len(pl) == len(p) and pl[0] is None
    for j in range(1, len(p)):
        entry = pl[j]
        assert entry is not None and entry.token_id == p[j] and len(entry.top) == 2
        assert entry.logprob == pytest.approx(float(ref[j - 1, p[j]]), abs=1e-4)
    # the same prompt again is in the cache; its prompt logprobs are still computed (and equal)
    again = llm.generate(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert again.prompt_logprobs is not None
    assert [e.logprob for e in again.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in pl[1:]], abs=1e-5)
    # a one-token prompt: one entry, None (it was None instead of a list; found by test_engine_fuzz.py)
    assert llm.generate(p[:1], SamplingParams(max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs == [None]


def test_min_tokens_holds_back_end_of_sequence(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    forced = SamplingParams(max_tokens=8, temperature=0, logit_bias={EOS: 100.0})
    assert llm.generate(prompt(6), forced)[0].token_ids == [EOS]
    out = llm.generate(prompt(6), forced.replace(min_tokens=5))[0]
    assert out.token_ids[-1] == EOS and len(out.token_ids) == 6 and EOS not in out.token_ids[:5]
    assert out.outputs[0].finish_reason == "stop"


def test_a_seeded_request_is_the_same_alone_or_in_a_crowd(tiny):
    llm = LLM(loaded=tiny, chunk_size=8)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate(prompt(10, 7), sp)[0].token_ids
    crowd = llm.generate([prompt(10 + i, 20 + i) for i in range(5)] + [prompt(10, 7)],
                         [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 5 + [sp])
    assert crowd[-1].token_ids == alone


def test_a_request_too_large_for_the_cache_is_refused_with_both_numbers(tiny):
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=64)
    with pytest.raises(ValueError, match=r"needs up to \d+ chunks.*the cache has 8"):
        llm.generate(prompt(60), SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="context is 1024"):
        llm.generate(prompt(1100), SamplingParams(max_tokens=1))


def test_pinned_system_prompt_stays_cached_through_a_flood(tiny):
    llm = LLM(loaded=tiny, chunk_size=8, kv_cache_tokens=8 * 20)
    system = prompt(40, 99)
    pin = llm.pin_prefix(system)
    assert pin.num_tokens == 40
    for i in range(6):  # each fills most of the pool, evicting what is not pinned
        llm.generate(prompt(70, 200 + i), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    hit = llm.generate(system + [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))[0]
    assert hit.metrics.num_cached_tokens == 40
    llm.unpin_prefix(pin)
    assert llm.reset_prefix_cache() > 0
    miss = llm.generate(system + [1, 2, 4], SamplingParams(max_tokens=2, temperature=0))[0]
    assert miss.metrics.num_cached_tokens == 0


# ---------------------------------------------------------------------------------------------- what users get wrong
def test_llm_takes_dtype_names_and_checks_the_device(tiny):
    from chunkattn.engine.llm import resolve_device, resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16; got 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="must be 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            LLM(device="cuda")
    with pytest.raises(ValueError, match="dtype must be"):
        LLM(dtype="float8")


def test_bad_calls_say_what_is_accepted(tiny):
    llm = LLM(loaded=tiny, kv_cache_tokens=1024, chunk_size=16)
    with pytest.raises(TypeError, match="prompts must be a prompt"):
        llm.generate(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompts must be a prompt"):
        llm.generate(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no field.*tempreature"):
        llm.generate([1, 2, 3], {"tempreature": 0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params must be a SamplingParams, a dict"):
        llm.generate([1, 2, 3], "greedy")  # type: ignore[arg-type]
    out = llm.generate([1, 2, 3], {"temperature": 0, "max_tokens": 3, "ignore_eos": True})  # type: ignore[arg-type]
    assert len(out[0].token_ids) == 3
    with pytest.raises(TypeError, match="conversations must be"):
        llm.chat(None)  # type: ignore[arg-type]


def test_chat_messages_are_checked_before_the_template():
    from chunkattn.engine.llm import check_messages

    check_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    for messages, words in [([{"role": "user"}], "content must be a string; got NoneType"),
                            ([{"role": "robot", "content": "x"}], "role must be one of"),
                            (["hi"], "is a str, not a"), ([], "non-empty list")]:
        with pytest.raises(ValueError, match=words):
            check_messages(messages)
