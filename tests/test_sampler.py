"""The batched sampler against a direct computation, one row and one option at a time."""

from __future__ import annotations

import math
import random

import pytest
import torch

from chunkattn.engine.sampler import Sampler, SamplingMetadata, uniform_from_counter, uniform_reference
from chunkattn.engine.sampling import SamplingParams

V = 37


def meta_for(params: list[SamplingParams], seeds: list[int] | None = None, counters: list[int] | None = None,
             outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
             blocked: list[list[int]] | None = None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.from_rows(
        params, seeds or [11 * i + 3 for i in range(n)], counters or [i for i in range(n)],
        outputs or [[] for _ in range(n)], prompts or [[] for _ in range(n)], blocked or [[] for _ in range(n)],
        V, torch.device("cpu"))


def direct_processed(logits: list[float], p: SamplingParams, output: list[int], prompt: list[int],
                     blocked: list[int]) -> list[float]:
    """Bias, blocked tokens and penalties of one row, in plain Python."""
    out = list(logits)
    for t, b in p.logit_bias.items():
        out[t] += b
    for t in blocked:
        out[t] = -math.inf
    seen_out = {t: output.count(t) for t in set(output)}
    for t in range(len(out)):
        if p.repetition_penalty != 1.0 and (t in seen_out or t in prompt):
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        if t in seen_out:
            out[t] -= p.frequency_penalty * seen_out[t] + p.presence_penalty
    return out


def direct_sample(logits: list[float], p: SamplingParams, u: float) -> int:
    """Temperature, top-k, top-p, min-p and the inverse CDF for one row, in plain Python."""
    if p.greedy:
        return max(range(len(logits)), key=lambda t: logits[t])
    order = sorted(range(len(logits)), key=lambda t: -logits[t])
    k = p.top_k if 0 < p.top_k < len(logits) else len(logits)
    kept = order[:k]
    scaled = [logits[t] / p.temperature for t in kept]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    if p.top_p < 1:
        cum, cut = 0.0, len(probs)
        for i, q in enumerate(probs):
            if cum >= p.top_p:
                cut = i
                break
            cum += q
        probs = probs[:cut] + [0.0] * (len(probs) - cut)
    if p.min_p > 0:
        pmax = max(probs)
        probs = [q if q >= p.min_p * pmax else 0.0 for q in probs]
    target = u * sum(probs)
    cum = 0.0
    for t, q in zip(kept, probs):
        cum += q
        if cum > target:
            return t
    return kept[max(i for i, q in enumerate(probs) if q > 0)]


def test_counter_uniform_matches_the_python_reference():
    rng = random.Random(0)
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, -5] + [rng.getrandbits(64) for _ in range(50)]
    counters = [rng.randrange(0, 10**6) for _ in seeds]
    from chunkattn.engine.sampler import _i64

    got = uniform_from_counter(torch.tensor([_i64(s) for s in seeds]), torch.tensor(counters)).tolist()
    want = [uniform_reference(s, c) for s, c in zip(seeds, counters)]
    assert got == pytest.approx(want, abs=0, rel=0)
    assert all(0 <= x < 1 for x in got)
    many = uniform_from_counter(torch.full((20000,), 42), torch.arange(20000))
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float((many < 0.1).float().mean()) - 0.1) < 0.01


OPTIONS = [
    dict(temperature=0),
    dict(temperature=0, logit_bias={3: 50.0}),
    dict(temperature=0, presence_penalty=1.5, frequency_penalty=0.7),
    dict(temperature=0, repetition_penalty=1.8),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, top_k=9, top_p=0.8),
    dict(temperature=2.0, min_p=0.2),
    dict(temperature=0.9, top_k=1),
    dict(temperature=1.1, presence_penalty=-1.0, repetition_penalty=0.7, logit_bias={0: -100.0, 5: 3.0}),
    dict(temperature=1.0, top_p=1e-9),
]


@pytest.mark.parametrize("trial", range(4))
def test_batched_sampler_equals_a_direct_computation_per_row(trial):
    """Every option in one mixed batch; each row must equal the plain-Python computation of that row."""
    gen = torch.Generator().manual_seed(100 + trial)
    params = [SamplingParams(**o) for o in OPTIONS]
    n = len(params)
    logits = torch.randn(n, V, generator=gen) * 3
    # outputs drawn from a few tokens, so that tokens repeat (frequency penalties count them)
    outputs = [torch.randint(0, 6, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    prompts = [torch.randint(0, V, (6,), generator=gen).tolist() for _ in range(n)]
    blocked = [[1, 2] if i % 3 == 0 else [] for i in range(n)]
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(n)]
    counters = [len(o) for o in outputs]
    meta = meta_for(params, seeds, counters, outputs, prompts, blocked)
    got = Sampler()(logits, meta).token_ids.tolist()
    processed_all = Sampler.process(logits, meta)
    for i, p in enumerate(params):
        processed = direct_processed(logits[i].tolist(), p, outputs[i], prompts[i], blocked[i])
        assert processed_all[i].tolist() == pytest.approx(processed, rel=1e-5, abs=1e-5), OPTIONS[i]
        want = direct_sample(processed, p, uniform_reference(seeds[i], counters[i]))
        assert got[i] == want, (i, OPTIONS[i])
        assert got[i] not in blocked[i]


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=1.0, top_k=4)
    probs = torch.softmax(logits[0, :4], 0).tolist()
    counts = [0] * 6
    n = 4000
    for c in range(n):
        meta = SamplingMetadata.from_rows([p], [7], [c], [[]], [[]], [[]], 6, torch.device("cpu"))
        counts[int(Sampler()(logits, meta).token_ids)] += 1
    assert counts[4] == counts[5] == 0
    for t in range(4):
        assert abs(counts[t] / n - probs[t]) < 0.03


def test_a_seeded_row_samples_the_same_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 6
    batch = Sampler()(logits, meta_for(params, list(range(6)), [4] * 6)).token_ids.tolist()
    for i in range(6):
        alone = Sampler()(logits[i : i + 1], meta_for(params[:1], [i], [4])).token_ids.tolist()
        assert alone == [batch[i]]


def test_logprobs_are_the_raw_distribution_with_sorted_alternatives():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=gen)
    params = [SamplingParams(temperature=0, logprobs=3, logit_bias={0: 100.0}), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, logprobs=0)]
    out = Sampler()(logits, meta_for(params))
    raw = torch.log_softmax(logits, -1)
    assert out.token_ids[0] == 0  # the bias decides the token ...
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])  # ... not its logprob
    assert out.top_ids.shape == (3, 3)
    assert torch.equal(out.top_ids[0], raw[0].topk(3).indices)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_sampling_params_validate_with_clear_messages():
    for bad, match in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                       (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
                       (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={1: 101}), "logit_bias"),
                       (dict(logprobs=21), "logprobs"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
                       (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(logit_bias={"7": 1}).logit_bias == {7: 1.0}


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 100, 49155])
@pytest.mark.parametrize("case", ["random", "ties", "nan", "all_-inf", "max_last"])
def test_greedy_argmax_equals_torch_argmax(vocab, case):
    """The native CPU argmax (greedy sampling) gives torch.argmax's index: the first maximum, NaN the largest."""
    from chunkattn import native
    from chunkattn.engine.sampler import argmax

    if not native.available():
        pytest.skip("native CPU kernels unavailable (no compiler): the torch path is used")
    g = torch.Generator().manual_seed(vocab * 7 + len(case))
    x = torch.randn(9, vocab, generator=g)
    if case == "ties":  # few distinct values: the maximum repeats across lanes and tail
        x = torch.randint(0, 3, (9, vocab), generator=g).float()
    elif case == "nan":
        x[::2, torch.randint(0, vocab, (1,), generator=g)] = float("nan")
        x[1, -1] = float("nan")
    elif case == "all_-inf":
        x[:] = float("-inf")
        x[3, vocab // 2] = -1e30
    elif case == "max_last":
        x[:, -1] = 1e9
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    assert torch.equal(argmax(x[:, : max(1, vocab - 1)]), x[:, : max(1, vocab - 1)].argmax(dim=-1))  # a view
