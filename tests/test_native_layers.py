"""The decoder's layer loop in one native call (chunkattn_layers.DecoderStack): bit-equal to the Python loop on
every product kind it takes, rebuilt when the model changes, and out of the way where it does not apply."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chunkattn import PrefixKVCache, native
from chunkattn.attention import get_backend
from chunkattn.model import load_model
from chunkattn.model.layers import Linear
from chunkattn.model.llama import DecoderLayer
from chunkattn.model.native_layers import ENV
from chunkattn.model.quant import kernel_supported
from chunkattn.system import kernel_paths

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")

BASE = {"model_type": "llama", "vocab_size": 211, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False}
SHAPES = {
    "gqa2": {},
    # Qwen2: a q/k/v bias; group 3 at head size 64 (the wide decode task); 3 layers; tied embeddings
    "qwen2-gqa3-d64": {"model_type": "qwen2", "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
                       "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
                       "tie_word_embeddings": True},
    "mha": {"num_key_value_heads": 4, "hidden_size": 32, "intermediate_size": 96, "head_dim": 8},
}


def make_model(tmp_path, shape: str, dtype: torch.dtype, quantization: str = "none", seed: int = 0):
    path = tmp_path / f"{shape}.json"
    path.write_text(json.dumps({**BASE, **SHAPES[shape]}))
    torch.manual_seed(seed)
    loaded = load_model(path, random_weights=True, dtype=dtype, quantization=quantization)
    for name, p in loaded.model.named_parameters():  # norms away from 1, so that they matter
        if name.endswith("layernorm.weight"):
            p.data.uniform_(0.5, 1.5)
    return loaded.model


class Counter:
    """Counts the Python loop's layer calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        forward = DecoderLayer.forward

        def counted(layer, *args, **kw):
            self.calls += 1
            return forward(layer, *args, **kw)

        monkeypatch.setattr(DecoderLayer, "forward", counted)


def both(model, attn, ids, pos, monkeypatch, counter) -> torch.Tensor:
    """The step through the stack and through the Python loop (the second writes the same K/V again);
    asserts they are bit-equal and that each ran."""
    monkeypatch.setenv(ENV, "1")
    before = counter.calls
    stacked = model(ids, pos, attn)
    assert counter.calls == before, "the native layer loop did not run"
    monkeypatch.setenv(ENV, "0")
    python = model(ids, pos, attn)
    assert counter.calls == before + len(model.model.layers)
    assert torch.equal(stacked, python), float((stacked - python).abs().max())
    return stacked


def step(model, cache, seqs, tokens, monkeypatch, counter) -> torch.Tensor:
    batch = cache.extend(seqs, tokens)
    ids = torch.tensor([t for ts in tokens for t in ts])
    pos = torch.tensor([p for s, ts in zip(seqs, tokens) for p in range(s.num_tokens - len(ts), s.num_tokens)])
    attn = get_backend("cpu", cache)
    attn.plan(batch)
    return both(model, attn, ids, pos, monkeypatch, counter)


def new_cache(model, dtype):
    cfg = model.config
    return PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=8, max_tokens=1024, dtype=dtype)


CASES = [(s, torch.float32, "none") for s in SHAPES] + [(s, torch.bfloat16, "none") for s in SHAPES] + [
    pytest.param("gqa2", torch.bfloat16, q, marks=pytest.mark.skipif(not kernel_supported(), reason="the quantized "
                 "kernel needs AVX512-BF16")) for q in ("q4_1", "q8_0", "q4_0")] + [
    pytest.param("qwen2-gqa3-d64", torch.bfloat16, "q4_1", marks=pytest.mark.skipif(
        not kernel_supported(), reason="the quantized kernel needs AVX512-BF16"))]


def with_parts(model) -> None:
    """Every layer's q/k/v as parts of two kinds (quant.QuantizedParts, as a Q4_K_M file's Q4_K q / k beside its
    Q6_K v load): q4_1 for q and k, q6_k for v, from the layer's weights."""
    from chunkattn.model import quant
    from helpers import q6_k_blocks

    cfg = model.config
    qk = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
    for layer in model.model.layers:
        lin = layer.self_attn.qkv_proj
        w = lin.dense_weight().float()
        parts = quant.BlockParts.of([quant.quantize(w[:qk], "q4_1"), q6_k_blocks(w[qk:])])
        lin.set_quantized(quant.pack(parts), torch.bfloat16)


PARTS_CASES = [pytest.param(s, torch.bfloat16, "q4_1+q6_k", marks=pytest.mark.skipif(
    not kernel_supported(), reason="the quantized kernel needs AVX512-BF16")) for s in ("gqa2", "qwen2-gqa3-d64")]


@pytest.mark.parametrize(("shape", "dtype", "quantization"), CASES + PARTS_CASES)
def test_stack_equals_the_python_loop_through_prefill_decode_and_mixed_steps(tmp_path, monkeypatch, shape, dtype,
                                                                             quantization):
    model = make_model(tmp_path, shape, dtype, quantization.split("+")[0], seed=len(shape))
    if "+" in quantization:  # q/k/v of two kinds (with Qwen2's q/k/v bias split over them)
        with_parts(model)
        qkv = model.model.layers[0].self_attn.qkv_proj.quant
        assert qkv.qtype == quantization and len(qkv.parts) == 2
        quantization = "q4_1"
    lin = model.model.layers[0].mlp.gate_up_proj  # the product kind under test
    if quantization != "none":
        assert lin.quant is not None and lin.quant.qtype == quantization
    elif dtype == torch.float32 and native.linear_supported():
        assert lin.packed is not None and lin.packed.kind == "panels"
    elif dtype == torch.bfloat16 and native.bf16_panels_supported():
        assert lin.packed is not None and lin.packed.kind == "bf16-panels"
    counter = Counter(monkeypatch)
    cache = new_cache(model, dtype)
    gen = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (21,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 12)]
    seqs = [cache.add_sequence(p) for p in prompts]
    step(model, cache, seqs, [p[s.num_cached_tokens:] for p, s in zip(prompts, seqs)], monkeypatch, counter)
    for i in range(10):  # batched decode over the shared prefix, one row per sequence; chunks fill and split
        step(model, cache, seqs, [[(3 * i + j) % vocab] for j in range(len(seqs))], monkeypatch, counter)
    late = prefix[:13] + [1, 2, 3]  # a prompt that shares part of a chunk, prefilled beside two decodes
    s3 = cache.add_sequence(late)
    step(model, cache, seqs + [s3], [[5], [6], late[s3.num_cached_tokens:]], monkeypatch, counter)
    seqs.append(s3)
    single = cache.add_sequence([9])  # one token, nothing shared
    step(model, cache, [single], [[9]], monkeypatch, counter)
    for i in range(3):
        step(model, cache, seqs, [[i + 1]] * len(seqs), monkeypatch, counter)


def test_stack_follows_weight_changes_hooks_and_backends(tmp_path, monkeypatch):
    dtype = torch.bfloat16 if native.bf16_panels_supported() else torch.float32
    model = make_model(tmp_path, "gqa2", dtype)
    counter = Counter(monkeypatch)
    cache = new_cache(model, dtype)
    seq = cache.add_sequence([1, 2, 3, 4, 5])
    step(model, cache, [seq], [[1, 2, 3, 4, 5]], monkeypatch, counter)
    stack = model.native_layers.stack
    assert stack is not None and stack.num_layers() == model.config.num_layers
    batch = cache.extend([seq], [[6]])  # one decode step, run again after each change (its K/V rewritten)
    ids, pos = torch.tensor([6]), torch.tensor([5])

    def planned(backend: str = "cpu"):
        attn = get_backend(backend, cache)
        attn.plan(batch)
        return attn

    def again() -> torch.Tensor:
        return both(model, planned(), ids, pos, monkeypatch, counter)

    baseline = again()
    assert model.native_layers.stack is stack  # nothing changed: the same stack
    # a weight changed in place (load_state_dict copies into the parameter): the layer repacks, the stack rebuilds
    qkv = model.model.layers[1].self_attn.qkv_proj
    model.load_state_dict({"model.layers.1.self_attn.qkv_proj.weight": 2 * qkv.dense_weight()}, strict=False)
    changed = again()
    assert model.native_layers.stack is not stack and not torch.equal(changed, baseline)
    # a parameter replaced (the registration hook): the new norm weight is used
    stack = model.native_layers.stack
    norm = model.model.layers[0].post_attention_layernorm
    norm.weight = nn.Parameter(torch.full_like(norm.weight, 0.25))
    replaced = again()
    assert model.native_layers.stack is not stack and not torch.equal(replaced, changed)
    # `.data =` on a linear weight swaps its storage
    down = model.model.layers[0].mlp.down_proj
    down.weight.data = down.dense_weight().flip(0).contiguous()  # (a new tensor)
    swapped = again()
    assert not torch.equal(swapped, replaced)
    # a layer replaced (the module registration hook)
    new_down = Linear(down.in_features, down.out_features).to(dtype)
    new_down.load_state_dict({"weight": down.dense_weight() * 0.5})
    new_down.prepack()
    model.model.layers[0].mlp.down_proj = new_down
    assert not torch.equal(again(), swapped)
    # a forward hook on a layer: the Python loop runs, so that the hook sees its call
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        monkeypatch.setenv(ENV, "1")
        calls = counter.calls
        model(ids, pos, planned())
        assert counter.calls == calls + model.config.num_layers and len(seen) == 1
    finally:
        handle.remove()
    hooked_out = model(ids, pos, planned())
    assert torch.equal(again(), hooked_out)  # the hook gone: the stack again
    # a deep copy (or a pickle) leaves the stack behind and builds its own
    import copy

    twin = copy.deepcopy(model)
    assert twin.native_layers.stack is None
    twin.prepack()  # copies leave the packs behind too
    assert torch.equal(both(twin, planned(), ids, pos, monkeypatch, counter), hooked_out)
    assert twin.native_layers.stack is not model.native_layers.stack
    # another attention backend: the Python loop with that backend's attention
    calls = counter.calls
    model(ids, pos, planned("torch"))
    assert counter.calls == calls + model.config.num_layers


def test_stack_follows_changes_no_registration_hook_sees(tmp_path, monkeypatch):
    """Changes that no parameter or module registration reports: a bias set to None, a norm's eps, a forward set
    on an instance, a hooked module put into a layer, layers deleted or reordered."""
    model = make_model(tmp_path, "qwen2-gqa3-d64", torch.float32)  # a q/k/v bias
    counter = Counter(monkeypatch)
    cache = new_cache(model, torch.float32)
    seq = cache.add_sequence([1, 2, 3, 4, 5])
    step(model, cache, [seq], [[1, 2, 3, 4, 5]], monkeypatch, counter)
    batch = cache.extend([seq], [[6]])
    ids, pos = torch.tensor([6]), torch.tensor([5])

    def planned(cache=cache, batch=batch):
        attn = get_backend("cpu", cache)
        attn.plan(batch)
        return attn

    def native_ran(cache=cache, batch=batch) -> bool:
        monkeypatch.setenv(ENV, "1")
        calls = counter.calls
        model(ids, pos, planned(cache, batch))
        return counter.calls == calls

    first = both(model, planned(), ids, pos, monkeypatch, counter)
    qkv = model.model.layers[1].self_attn.qkv_proj
    qkv.bias = None  # a parameter set to None: no registration hook runs
    no_bias = both(model, planned(), ids, pos, monkeypatch, counter)
    assert not torch.equal(no_bias, first)
    model.model.layers[0].input_layernorm.eps = 0.5  # a plain attribute
    assert not torch.equal(both(model, planned(), ids, pos, monkeypatch, counter), no_bias)
    # a forward set on an instance: the Python loop calls it
    mlp = model.model.layers[0].mlp
    seen = []
    mlp_forward = type(mlp).forward

    def traced(x: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return mlp_forward(mlp, x)

    mlp.forward = traced
    assert not native_ran() and seen
    del mlp.forward
    assert native_ran()
    # a module that already has a hook, put into a layer: the hook runs
    hooked = Linear(qkv.in_features, qkv.out_features, bias=False)
    hooked.load_state_dict({"weight": qkv.dense_weight().clone()})
    hooked.prepack()
    hook_calls = []
    hooked.register_forward_hook(lambda m, a, out: hook_calls.append(1))
    assert native_ran()  # the handle was made before the layer took the module
    model.model.layers[1].self_attn.qkv_proj = hooked
    assert not native_ran() and hook_calls
    model.model.layers[1].self_attn.qkv_proj = qkv
    assert native_ran()
    # a layer deleted (ModuleList moves its modules without a hook): the stack runs the two left, on the
    # 3-layer cache as the Python loop does
    del model.model.layers[2]
    both(model, planned(), ids, pos, monkeypatch, counter)
    assert model.native_layers.stack.num_layers() == 2
    # layers reordered: layer i no longer attends on the cache's layer i, so the Python loop runs
    model.model.layers.insert(0, model.model.layers[1])
    del model.model.layers[2]
    assert not native_ran()


def test_info_names_the_layer_loop(monkeypatch):
    assert kernel_paths()["layer loop"].startswith("native")
    monkeypatch.setenv(ENV, "0")
    assert kernel_paths()["layer loop"] == f"Python ({ENV}=0)"
