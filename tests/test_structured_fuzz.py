"""Property-based: constrained decoding never produces an output its JSON schema rejects.

Hypothesis writes small JSON schemas (objects of up to three properties, nested up to two levels: integers and
numbers with bounds, booleans, strings with a length limit or a pattern, enums, arrays with an item limit; any
subset required; extra properties forbidden or not), and the default model (SmolLM2-135M-Instruct) answers a chat
prompt under each with sampling (two completions, a fresh seed, jump-forward on): every completion that stopped
must parse as JSON and validate against its schema (jsonschema). Each run draws new schemas
(``CHUNKATTN_FUZZ_EXAMPLES`` for a longer search).
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chunkattn import LLM, SamplingParams
from chunkattn.engine.structured import StructuredOutputs

NAMES = st.sampled_from(["id", "name", "count", "price", "ok", "tags", "meta", "x_1"])
LEAF = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 10)),
    st.just({"type": "string", "pattern": "^[a-z]{2,5}$"}),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["red", "green", "blue", 3, True, None]),
                                                 min_size=1, max_size=3, unique=True)),
)


def objects(children: st.SearchStrategy) -> st.SearchStrategy:
    def make(props: dict, required: list, closed: bool) -> dict:
        return {"type": "object", "properties": props, "required": [k for k in required if k in props],
                "additionalProperties": not closed}
    return st.builds(make, st.dictionaries(NAMES, children, min_size=1, max_size=3),
                     st.lists(NAMES, max_size=3, unique=True), st.booleans())


VALUE = st.recursive(LEAF, lambda inner: st.one_of(
    objects(inner), st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner,
                              st.integers(1, 3))), max_leaves=5)
SCHEMA = objects(VALUE)


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_tokens=8192)


@settings(max_examples=int(os.environ.get("CHUNKATTN_FUZZ_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMA, seed=st.integers(0, 2**31))
def test_every_stopped_output_validates_against_its_schema(llm, schema, seed):
    jsonschema.Draft202012Validator.check_schema(schema)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe an item as JSON."}])
    params = SamplingParams(n=2, max_tokens=96, temperature=1.0, seed=seed, structured=StructuredOutputs(json=schema))
    (out,) = llm.generate([prompt], params)
    for c in out.outputs:
        assert c.finish_reason in ("stop", "length"), c
        event(f"finish: {c.finish_reason}")  # (--hypothesis-show-statistics)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
