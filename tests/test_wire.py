"""Outputs on the wire between replicas and the ingress: deltas only, rebuilt equal to the engine's own."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from chunkattn.cluster.wire import OutputAssembler, ReplicaRequest, slim
from chunkattn.engine import LLM, SamplingParams
from chunkattn.model import load_model
from server_helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def llm():
    return LLM(loaded=load_model(TINY_CONFIG, random_weights=True), kv_cache_tokens=2048, chunk_size=16)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
    SamplingParams(n=3, max_tokens=7, temperature=1.0, seed=5, logprobs=2, prompt_logprobs=1, ignore_eos=True),
])
def test_slim_outputs_rebuild_the_engine_outputs(llm, params):
    outputs = list(llm.stream(list(range(100, 121)), params))
    assert len(outputs) > 2 and outputs[-1].finished
    assemble = OutputAssembler()
    sent = [pickle.loads(pickle.dumps(slim(o, first=i == 0))) for i, o in enumerate(outputs)]
    for original, wire in zip(outputs, sent):
        assert all(not c.token_ids and not c.text for c in wire.outputs)  # only what is new travels
        rebuilt = assemble(wire)
        want = dataclasses.replace(original, outputs=[dataclasses.replace(c, token_times=[])
                                                      for c in original.outputs])
        assert rebuilt == want
    assert sum(len(pickle.dumps(s)) for s in sent[1:]) < sum(len(pickle.dumps(o)) for o in outputs[1:])


def test_a_replica_request_reads_as_text_one_character_per_token():
    r = ReplicaRequest([72, 105, 0x1F600], SamplingParams(), "r")
    assert r.prompt == "Hi\U0001F600" and len(r.prompt) == 3
