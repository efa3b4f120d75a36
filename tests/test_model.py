"""The decoder against Hugging Face transformers' LlamaForCausalLM (fp32, CPU): same weights, same logits."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from chunkattn import PrefixKVCache, native
from chunkattn.model import ModelConfig, UnsupportedModelError, build_model, config_from_hf, load_model
from helpers import run_model, torch_threads


def hf_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=512,
                tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def make_pair(**kw):
    cfg = hf_config(**kw)
    hf = HFLlama(cfg).eval().requires_grad_(False)
    ours = build_model(ModelConfig.from_hf(cfg.to_dict()), dict(hf.state_dict()), torch.float32, "cpu")
    return hf, ours, ours.config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def run_step(model, cache, seqs, tokens):
    batch = cache.extend(seqs, tokens)
    ids = torch.tensor([t for ts in tokens for t in ts])
    pos = torch.tensor([p for s, ts in zip(seqs, tokens) for p in range(s.num_tokens - len(ts), s.num_tokens)])
    return run_model(model, cache, batch, ids, pos)


@pytest.mark.parametrize("kw", [
    {},  # GQA 4/2
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"num_key_value_heads": 1, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_logits_match_transformers_prefill_and_decode_with_shared_prefixes(kw):
    hf, ours, cfg = make_pair(**kw)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 97, (19,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 9, 1)]
    cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=8, max_tokens=512,
                          dtype=torch.float32)
    seqs, worst = [], 0.0
    for p in prompts:  # one at a time, so later prompts hit the cache
        s = cache.add_sequence(p)
        logits = run_step(ours, cache, [s], [p[s.num_cached_tokens:]])
        ref = hf(torch.tensor([p])).logits[0, s.num_cached_tokens:]
        worst = max(worst, rel(logits, ref))
        seqs.append(s)
    assert seqs[1].num_cached_tokens >= 19
    for step in range(6):  # batched decode over shared prefixes
        nxt = [[(7 * step + i) % 97] for i in range(len(seqs))]
        logits = run_step(ours, cache, seqs, nxt)
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([list(s.token_ids)])).logits[0, -1]
            worst = max(worst, rel(logits[i], ref))
    assert worst < 1e-4, worst


def test_qwen2_style_bias_and_unsupported_architectures():
    cfg = hf_config().to_dict() | {"model_type": "qwen2"}
    assert config_from_hf(cfg).qkv_bias  # Qwen2's q/k/v projections always carry a bias
    assert not config_from_hf(hf_config().to_dict()).qkv_bias
    assert config_from_hf(hf_config(attention_bias=True).to_dict()).qkv_bias
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf(hf_config().to_dict() | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_load_hf_directory_with_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    hf, _, _ = make_pair()
    cfg = hf.config
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")))
    tok.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    ids = torch.tensor([1, 5, 7, 9])
    cache = PrefixKVCache(2, 2, 16, chunk_size=4, max_tokens=64, dtype=torch.float32)
    s = cache.add_sequence(ids.tolist())
    logits = run_step(loaded.model, cache, [s], [ids.tolist()])
    assert rel(logits, hf(ids[None]).logits[0]) < 1e-4
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def packed_kind(dtype: torch.dtype) -> str:
    """The layout Linear.prepack picks for a CPU weight of this dtype on this machine."""
    if dtype == torch.float32 and native.linear_supported():
        return "panels"
    if dtype == torch.bfloat16 and native.bf16_panels_supported():
        return "bf16-panels"
    return "onednn"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 13, 32, 129])
@pytest.mark.parametrize(("fan_in", "fan_out", "bias"), [(96, 80, True), (33, 49, False), (576, 960, False),
                                                          (7, 1, True), (64, 95, True), (17, 47, True), (5, 96, False)])
def test_prepacked_linear_equals_the_plain_product(dtype, rows, fan_in, fan_out, bias):
    """Every packed layout (chunkattn's float32 panels where the CPU has AVX-512, bfloat16 AMX tile panels where
    it has AMX, oneDNN's otherwise) against F.linear in float64: row counts through every size of the 8-row tile
    and pairs of 16-row tiles, widths across the 48- and 32-column panels (the last one partial inside each of its
    vectors, or whole), with and without bias."""
    from chunkattn.model.layers import Linear

    torch.manual_seed(rows * 1000 + fan_in)
    lin = Linear(fan_in, fan_out, bias=bias)
    torch.nn.init.normal_(lin.weight)
    if bias:
        torch.nn.init.normal_(lin.bias)
    lin = lin.to(dtype)
    x = torch.randn(rows, fan_in).to(dtype)
    plain = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double() if bias else None)
    assert lin.prepack() == Linear.can_prepack(lin.weight)
    assert (lin.packed is not None) == Linear.can_prepack(lin.weight)  # no oneDNN and no AVX-512: F.linear
    assert lin.packed is None or lin.packed.kind == packed_kind(dtype)
    with torch.inference_mode():
        out = lin(x)
        strided = lin(torch.cat([x, x], dim=1)[:, :fan_in])  # a view with a longer row stride
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (rows, fan_out)
    assert (rows == 0 or rel(out.double(), plain) < tol) and torch.equal(strided, out)
    assert "packed" not in lin.state_dict() and list(lin.state_dict()) == ["weight", "bias"][: 1 + bias]
    lin.to(torch.float32)  # moving drops the packed copy instead of using a stale one
    assert lin.packed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,fan_in,inner", [(1, 16, 24), (8, 64, 1), (9, 33, 25), (17, 576, 40), (3, 20, 48),
                                               (0, 8, 5), (13, 7, 71)])
def test_gate_up_linear_equals_silu_of_gate_times_up(dtype, rows, fan_in, inner):
    """The MLP's fused gate/up layer (one float32 kernel with SiLU-and-multiply in its epilogue where the CPU has
    AVX-512; the product, then silu_and_mul otherwise) against F.silu(x W_gate^T) * (x W_up^T) in float64: row
    counts through the 8-row tile, I across the panels' 24 outputs (the last panel partial inside its first or
    second vector, or whole), the sigmoid's saturated ends."""
    from chunkattn.model.layers import GateUpLinear

    torch.manual_seed(rows * 1000 + inner)
    lin = GateUpLinear(fan_in, inner)
    torch.nn.init.normal_(lin.weight, std=fan_in ** -0.5)
    lin = lin.to(dtype)
    with torch.no_grad():
        lin.weight[0] *= 300  # gate 0 of every row far out on either side of zero: the sigmoid saturates
    x = (torch.randn(rows, fan_in) * 3).to(dtype)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double())
    ref = torch.nn.functional.silu(ref[:, :inner]) * ref[:, inner:]
    assert lin.prepack() == GateUpLinear.can_prepack(lin.weight)
    assert lin.packed is None or lin.packed.kind == packed_kind(dtype)
    with torch.inference_mode():
        out = lin(x)
        strided = lin(torch.cat([x, x], dim=1)[:, :fan_in])
    assert out.dtype == dtype and out.shape == (rows, inner)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.equal(strided, out) and torch.isfinite(out).all()
    # The saturated column's bound per element: what a float32-accumulated dot product of fan_in terms
    # guarantees, fan_in * eps * sum |x_k w_k| for the gate g and the up value u, carried through silu(g) * u
    # (|silu'| <= 1.1). An element-wise rtol is wrong here: with x W summing terms of both signs, one element can
    # be 1000x smaller than its terms (seen at ~3e-4 relative on an Intel Xeon with AMX, whose oneDNN path adds
    # in another order), and no float32 product promises better than its terms' scale.
    xa, wa = x.double().abs(), lin.weight.detach().double().abs()
    g_abs, u_abs = xa @ wa[0], xa @ wa[inner]  # [rows]: sum_k |x_k w_k| of gate 0 and up 0
    g0, u0 = (x.double() @ lin.weight.detach().double()[[0, inner]].T).unbind(1)
    eps, eps_out = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps  # float32 sums, rounded to dtype
    bound0 = (fan_in * eps * (1.1 * u0.abs() * g_abs + torch.nn.functional.silu(g0).abs() * u_abs)
              + 2 * eps_out * ref[:, 0].abs() + 1e-6)

    def close(y: torch.Tensor) -> bool:  # the saturated column apart (its size would hide the others' errors)
        y = y.detach().double()
        return rows == 0 or (bool(((y[:, 0] - ref[:, 0]).abs() <= bound0).all())  # silu(-400) * u ~ 0
                             and (inner == 1 or rel(y[:, 1:], ref[:, 1:]) < tol))

    assert close(out)
    unpacked = GateUpLinear(fan_in, inner).to(dtype)
    unpacked.load_state_dict(lin.state_dict())
    assert close(unpacked(x))  # the dense path: the product, then silu_and_mul


@pytest.mark.skipif(not native.linear_supported(), reason="needs AVX-512")
def test_gate_up_op_refuses_mismatched_operands():
    ops = torch.ops.chunkattn_layers
    with pytest.raises(RuntimeError, match="gate; up"):
        ops.pack_gate_up(torch.randn(7, 16))  # an odd number of rows is no [gate; up] pair
    packed = ops.pack_gate_up(torch.randn(2 * 30, 16))  # I = 30: 2 panels of 24 outputs
    with pytest.raises(RuntimeError, match="packed must be pack_gate_up"):
        ops.linear_silu_mul(torch.randn(3, 16), packed, 49)  # 3 panels' worth
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_silu_mul(torch.randn(3, 15), packed, 30)  # K mismatch
    assert ops.linear_silu_mul(torch.randn(3, 16), packed, 30).shape == (3, 30)


@pytest.mark.skipif(not native.linear_supported(), reason="needs AVX-512")
def test_gate_up_op_edges_and_uneven_threads():
    """The fused op itself: K = 0 (silu(0) * 0), I = 0, and 7 panels split unevenly over 3 threads."""
    ops = torch.ops.chunkattn_layers
    torch.manual_seed(2)
    assert torch.equal(ops.linear_silu_mul(torch.randn(5, 0), ops.pack_gate_up(torch.randn(14, 0)), 7),
                       torch.zeros(5, 7))
    assert ops.linear_silu_mul(torch.randn(5, 3), ops.pack_gate_up(torch.randn(0, 3)), 0).shape == (5, 0)
    inner = 7 * 24 - 5
    w, x = torch.randn(2 * inner, 31), torch.randn(21, 31)
    with torch_threads(3):
        out = ops.linear_silu_mul(x, ops.pack_gate_up(w), inner)
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert rel(out.double(), torch.nn.functional.silu(ref[:, :inner]) * ref[:, inner:]) < 1e-5


def test_prepacked_linear_follows_weight_changes_and_autograd():
    """A weight changed in place after packing (load_state_dict) is repacked, not multiplied stale; with autograd
    on, the product is F.linear's (the packed kernels have no backward); copies leave the pack behind."""
    import copy
    import pickle

    from chunkattn.model.layers import Linear

    torch.manual_seed(0)
    lin = Linear(40, 50, bias=True)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(9, 40)
    if not lin.prepack():
        pytest.skip("no CPU packing here")
    new = {"weight": torch.randn(50, 40), "bias": torch.randn(50)}
    lin.load_state_dict(new)
    with torch.inference_mode():
        out = lin(x)
    fresh = torch.nn.functional.linear(x.double(), new["weight"].double(), new["bias"].double())
    assert rel(out.double(), fresh) < 1e-5
    y = lin(x.requires_grad_())  # grad mode: F.linear, so gradients reach the weight
    y.sum().backward()
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, x.detach().sum(0).expand(50, 40))
    assert copy.deepcopy(lin).packed is None and pickle.loads(pickle.dumps(lin)).packed is None
    assert lin.packed is not None


@pytest.mark.skipif(not native.linear_supported(), reason="needs AVX-512")
def test_packed_linear_op_edges_and_uneven_threads():
    """The op itself: K = 0, N = 0, and panels split unevenly over threads (3 threads, 7 panels)."""
    ops = torch.ops.chunkattn_layers
    torch.manual_seed(1)
    assert torch.equal(ops.linear(torch.randn(5, 0), ops.pack_linear(torch.randn(7, 0)), 7, None), torch.zeros(5, 7))
    assert ops.linear(torch.randn(5, 3), ops.pack_linear(torch.randn(0, 3)), 0, None).shape == (5, 0)
    w, x, b = torch.randn(7 * 48 - 5, 31), torch.randn(21, 31), torch.randn(7 * 48 - 5)
    with torch_threads(3):
        out = ops.linear(x, ops.pack_linear(w), w.shape[0], b)
    assert rel(out.double(), torch.nn.functional.linear(x.double(), w.double(), b.double())) < 1e-5


@pytest.mark.skipif(not native.linear_supported(), reason="needs AVX-512")
def test_packed_linear_refuses_mismatched_operands():
    ops = torch.ops.chunkattn_layers
    packed = ops.pack_linear(torch.randn(50, 16))  # 2 panels
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear(torch.randn(3, 17), packed, 50, None)  # K differs
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear(x, packed, 97, None)  # more columns than the panels hold
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear(x, packed, 48, None)  # fewer: a whole panel would be ignored
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear(x, packed.transpose(1, 2).contiguous().transpose(1, 2), 50, None)  # not contiguous
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(x, packed, 50, torch.randn(49))
    with pytest.raises(RuntimeError, match="x must be"):
        ops.linear(x.double(), packed, 50, None)
    with pytest.raises(RuntimeError, match="CPU tensor"):
        ops.linear(x.to("meta"), packed, 50, None)  # another device: refused, not read as host memory
    with pytest.raises(RuntimeError, match="CPU tensor"):
        ops.pack_linear(torch.randn(50, 16, device="meta"))


def test_weights_that_cannot_fit_are_refused_before_they_are_read_and_packs_are_counted(tmp_path, monkeypatch):
    """A model whose weights cannot fit the memory available is refused at once, saying what it needs and what
    to use; what a loaded model holds counts its packs."""
    from chunkattn import InsufficientMemoryError
    from chunkattn.model import quant
    from chunkattn.model.layers import Linear
    from chunkattn.model.loader import weight_bytes
    from server_helpers import TINY_CONFIG

    huge = tmp_path / "huge.json"  # ~4.9 T parameters: no machine here has 9.8 TB for them in bf16
    huge.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 65536, "intermediate_size": 262144,
        "num_hidden_layers": 80, "num_attention_heads": 512, "num_key_value_heads": 64,
        "max_position_embeddings": 512}))
    quantized = quant.kernel_supported()  # (where quantized weights run on their kernel, they are advised)
    with pytest.raises(InsufficientMemoryError, match=r"loading the model's 4900\.\d+ B weights in bfloat16 takes at "
                       r"least .* GiB \(read, then packed for the kernels a matrix at a time.*\).*use " +
                       (r"--quantization q8_0 / q4_0 \(or a smaller model\)" if quantized else r"a smaller model$")):
        load_model(huge, dtype=torch.bfloat16, random_weights=True)
    with pytest.raises(InsufficientMemoryError, match=r"in Q4_0 blocks takes at least ([\d.]+) GiB \(each quantized as "
                       r"read, then packed a matrix at a time\).* use a smaller model$") as q4:
        load_model(huge, dtype=torch.bfloat16, random_weights=True, quantization="q4_0")
    with pytest.raises(InsufficientMemoryError, match=r"in Q8_0 blocks takes at least ([\d.]+) GiB .* use "
                       r"--quantization q4_0 \(or a smaller model\)$") as q8:
        load_model(huge, dtype=torch.bfloat16, random_weights=True, quantization="q8_0")
    with pytest.raises(InsufficientMemoryError, match=r"bfloat16 takes at least ([\d.]+) GiB") as bf16:
        load_model(huge, dtype=torch.bfloat16, random_weights=True, quantization="none")
    # the blocks as read (a byte or half a byte a value, 2 or 4 bytes of scales per 32) beside a matrix in bf16
    gib = {k: float(re.search(r"at least ([\d.]+) GiB", str(e.value)).group(1)) for k, e in
           (("q4", q4), ("q8", q8), ("bf16", bf16))}
    assert 0.3 < gib["q4"] / gib["bf16"] < 0.35 and 0.52 < gib["q8"] / gib["bf16"] < 0.56, gib
    with pytest.raises(InsufficientMemoryError, match=r"use --dtype bfloat16" + (
            r" \(with --quantization q8_0 / q4_0 if that is not enough\)$" if quantized else
            r" \(or a smaller model\)$")):
        load_model(huge, dtype=torch.float32, random_weights=True)
    with pytest.raises(InsufficientMemoryError, match=r"use --dtype bfloat16 --quantization q8_0 / q4_0 \(or a "
                       r"smaller model\)$" if quantized else r"use a smaller model$"):  # (quantized runs in bf16)
        load_model(huge, dtype=torch.float16, random_weights=True)
    with monkeypatch.context() as m:  # a CPU whose packs (oneDNN's) leave the dense weights held too
        m.setattr(Linear, "pack_replaces_dense", lambda self, dtype: False)
        with pytest.raises(InsufficientMemoryError, match=r"4\d\d\d\.\d\d B of them held both dense and packed"):
            load_model(huge, dtype=torch.bfloat16, random_weights=True)

    tiny = load_model(TINY_CONFIG, random_weights=True, dtype=torch.float32)
    sizes = weight_bytes(tiny.model)
    linears = sum(m.in_features * m.out_features * 4 for m in tiny.model.modules()
                  if isinstance(m, Linear) and m.packed is not None)
    assert linears > 0 and sizes["packed"] >= linears  # (panels round the outputs up to whole panels)
    assert sizes["total"] == sizes["dense"] + sizes["packed"] + sizes["quantized"]


def test_a_gguf_file_that_cannot_be_converted_in_memory_is_refused_before_its_tensors_are_read(tmp_path,
                                                                                                 monkeypatch):
    """A GGUF file's first dense load dequantizes it whole to float32 (transformers' reader): a file whose
    metadata describes 4.9 T weights is refused from its metadata alone, saying what to use instead."""
    import numpy as np
    from gguf import GGUFWriter

    from chunkattn import InsufficientMemoryError
    from chunkattn.model import quant

    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "huge.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(80)
    w.add_context_length(4096)
    w.add_embedding_length(65536)
    w.add_feed_forward_length(262144)
    w.add_head_count(512)
    w.add_head_count_kv(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32000)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))  # (the file holds almost nothing)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InsufficientMemoryError, match=r"converting huge\.gguf \(a GGUF file's first load dequantizes "
                       r"its 4\d{3}\.\d+ B weights whole, to float32.*takes at least \d+\.\d GiB, but this machine has "
                       r".*use " + (r"--dtype bfloat16 with --quantization auto or q8_0 / q4_0"
                                    if quant.kernel_supported() else r"a Hugging Face checkpoint")):
        load_model(path, dtype=torch.float32, quantization="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in", [64, 4160])
def test_the_memory_check_knows_which_layers_drop_their_dense_weight(dtype, fan_in):
    """pack_replaces_dense (what check_weights_fit counts) says what prepack + drop_dense do on this CPU (K = 4160:
    above the AMX panels' every-row-count limit, where bf16 layers keep their dense weight on AMX machines)."""
    from chunkattn.model.layers import Linear

    lin = Linear(fan_in, 40).to(dtype)
    expect = lin.pack_replaces_dense(dtype)
    assert (lin.prepack() and lin.drop_dense()) == expect
    assert lin.dense_dropped == expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("gate_up", "fan_in", "fan_out"), [(False, 70, 37), (False, 64, 96), (False, 33, 1),
                                                           (True, 50, 35), (True, 64, 16), (True, 100, 49)])
def test_a_layer_held_only_as_its_pack_unpacks_exactly_and_multiplies_the_same(dtype, gate_up, fan_in, fan_out):
    """drop_dense: the weight held once, as packed; dense_weight() unpacks it bit for bit (odd sizes: panels and
    K steps padded), products are unchanged (the panels, and F.linear under autograd), and a copy, a pickle, a
    move to another dtype or a new prepack get the dense weight back."""
    import copy
    import pickle

    from chunkattn.model.layers import GateUpLinear, Linear

    torch.manual_seed(fan_in * 7 + fan_out)
    lin = (GateUpLinear(fan_in, fan_out) if gate_up else Linear(fan_in, fan_out, bias=True)).to(dtype)
    torch.nn.init.normal_(lin.weight, std=0.1)
    if lin.bias is not None:
        torch.nn.init.normal_(lin.bias, std=0.1)
    lin.requires_grad_(False)
    w = lin.weight.detach().clone()
    if not (lin.prepack() and lin.packed is not None and lin.packed.kind in ("panels", "bf16-panels")):
        assert not lin.drop_dense()
        pytest.skip(f"{dtype} weights are not packed into chunkattn's panels on this CPU")
    x = torch.randn(7, fan_in, dtype=dtype)
    xg = x.clone().requires_grad_(True)  # autograd: F.linear on the dense weight
    with torch.inference_mode():
        y = lin(x)
    yg = lin(xg)
    assert lin.drop_dense() and lin.dense_dropped and lin.weight.numel() == 0 and lin.weight.dtype == dtype
    assert not lin.drop_dense()  # once
    assert torch.equal(lin.dense_weight(), w)
    with torch.inference_mode():
        assert torch.equal(lin(x), y)
    assert torch.equal(lin(xg), yg)  # (F.linear on the unpacked weight)
    for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert not twin.dense_dropped and twin.packed is None and torch.equal(twin.weight, w)
    moved = copy.deepcopy(lin)
    lin.to(torch.float64)
    assert not lin.dense_dropped and torch.equal(lin.weight, w.double())
    moved.prepack()  # (a deep copy has no pack: it repacks from the dense weight)
    assert moved.drop_dense() and moved.prepack() and not moved.dense_dropped and torch.equal(moved.weight, w)
    assert moved.drop_dense()
    moved.weight.data = w.flip(0).contiguous()  # a new weight for the placeholder: it is used, not the old pack
    assert torch.equal(moved.dense_weight(), w.flip(0))
    twin = _dense_twin(moved, w.flip(0))
    with torch.inference_mode():
        assert torch.equal(moved(x), twin(x))
    loaded = copy.deepcopy(moved)
    assert loaded.drop_dense() or loaded.prepack() and loaded.drop_dense()
    loaded.load_state_dict({"weight": w, **({"bias": lin.bias} if lin.bias is not None else {})})
    with torch.inference_mode():  # (load_state_dict restores the dense weight, then repacks)
        assert torch.equal(loaded(x), y)


def _dense_twin(lin, weight):
    """A copy of ``lin`` with ``weight``, packed and keeping it dense."""
    import copy

    twin = copy.deepcopy(lin)
    twin.restore_dense()
    twin.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    twin.prepack()
    return twin


def test_a_loaded_model_holds_its_linear_weights_once():
    """build_model drops the dense copy of every packed linear weight (not a head tied to the embeddings): logits
    equal a model that keeps them, the Hugging Face state dict is the same, and the dense bytes shrink."""
    from chunkattn.model.layers import Linear
    from chunkattn.model.loader import weight_bytes
    from server_helpers import TINY_CONFIG

    cfg = json.loads(TINY_CONFIG.read_text())
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(TINY_CONFIG, random_weights=True, dtype=dtype)
        model = loaded.model
        dropped = [m for m in model.modules() if isinstance(m, Linear) and m.dense_dropped]
        if not dropped:
            continue  # (no chunkattn panels on this CPU for this dtype)
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        assert not (tied and model.lm_head.dense_dropped) and cfg.get("tie_word_embeddings", True) == tied
        keep = build_model(loaded.config, model.hf_state_dict(), dtype, "cpu", prepack=False)
        keep.prepack()  # packs, keeps the dense weights
        assert not any(m.dense_dropped for m in keep.modules() if isinstance(m, Linear))
        a, b = model.hf_state_dict(), keep.hf_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        freed = sum(m.out_features * m.in_features * dtype.itemsize for m in dropped)
        assert weight_bytes(keep)["dense"] - weight_bytes(model)["dense"] == freed > 0
        assert weight_bytes(model)["packed"] == weight_bytes(keep)["packed"]
        ids = torch.arange(3, 40).remainder(cfg["vocab_size"])
        logits = []
        for m in (model, keep):
            c = loaded.config
            cache = PrefixKVCache(c.num_layers, c.num_kv_heads, c.head_dim, chunk_size=8, max_tokens=256, dtype=dtype)
            seq = cache.add_sequence(ids.tolist(), reuse_prefix=False)
            batch = cache.extend([seq], [ids.tolist()])
            with torch.inference_mode():
                logits.append(run_model(m, cache, batch, ids, torch.arange(len(ids))))
        assert torch.equal(logits[0], logits[1])


def test_fused_projections_round_trip_to_hugging_face_names():
    cfg = hf_config().to_dict() | {"model_type": "qwen2"}
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    ours = build_model(config_from_hf(cfg), dict(hf.state_dict()), torch.float32, "cpu")
    assert ours.model.layers[0].self_attn.qkv_proj.bias is not None
    back = ours.hf_state_dict()
    want = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_a_new_family_is_one_registration(tmp_path):
    from chunkattn.model import LlamaForCausalLM, ModelFamily, register_family, supported_model_types
    from chunkattn.model.registry import _FAMILIES

    cfg = hf_config().to_dict() | {"model_type": "toyllama"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="toyllama.*llama"):
        config_from_hf(cfg)
    register_family(ModelFamily("toy", ("toyllama",), LlamaForCausalLM, qkv_bias=True))
    try:
        assert "toyllama" in supported_model_types()
        loaded = load_model(tmp_path / "config.json", random_weights=True)
        assert loaded.config.qkv_bias and loaded.model.model.layers[0].self_attn.qkv_proj.bias is not None
    finally:
        _FAMILIES.pop("toyllama")


needs_bf16_panels = pytest.mark.skipif(not native.bf16_panels_supported(),
                                       reason="needs a CPU with AMX tiles or AVX512-BF16 (the bf16 panel kernels)")


@needs_bf16_panels
@pytest.mark.parametrize("rows,fan_in,fan_out", [(1, 576, 960), (17, 40, 33), (33, 96, 64), (100, 1536, 576),
                                                 (3, 31, 1), (64, 64, 32), (50, 2048, 95), (129, 31, 33),
                                                 (200, 576, 2000), (150, 2048, 95), (300, 2048, 40),
                                                 (20, 2100, 70)])
def test_bf16_panel_linear_ops_against_float64(rows, fan_in, fan_out, two_threads):
    """The bf16 panel kernels alone (on AMX tiles, else by vdpbf16ps): row counts off the 16-row tiles, K off the
    32-deep steps (zero-padded copies of x), N off the 32-column panels, bias; and the gate/up kernel's
    silu(gate) * up epilogue. Above 128 rows the AMX panels go by groups through every pair of row tiles
    (n = 2000, K = 576, two threads: groups of 28 and 4 panels, and 28 and 3), the vdpbf16ps ones by 1 MB blocks
    of x's rows (300 x 2048: two blocks): each output the same products in the same order as at fewer rows, so
    bit-equal to them. By vdpbf16ps a row's output is the same whichever rows share its call (a batch's
    composition never changes a sequence's tokens)."""
    ops = torch.ops.chunkattn_layers
    torch.manual_seed(rows + fan_in)
    x, w, b = (torch.randn(rows, fan_in).bfloat16(), torch.randn(fan_out, fan_in).bfloat16(),
               torch.randn(fan_out).bfloat16())
    out = ops.linear_amx(x, ops.pack_linear_amx(w), fan_out, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, fan_out)
    assert rel(out.double(), x.double() @ w.double().T + b.double()) < 5e-3
    strided = ops.linear_amx(torch.cat([x, x], dim=1)[:, :fan_in], ops.pack_linear_amx(w), fan_out, b)
    assert torch.equal(strided, out)
    wg = torch.randn(2 * fan_out, fan_in).bfloat16()
    g = ops.linear_silu_mul_amx(x, ops.pack_gate_up_amx(wg), fan_out)
    prod = x.double() @ wg.double().T
    assert rel(g.double(), torch.nn.functional.silu(prod[:, :fan_out]) * prod[:, fan_out:]) < 5e-3
    if rows > 8 and not native.amx_linear_supported():  # passes of 8 rows and of the rest, called alone
        for lo, hi in ((0, 8), (rows - 5, rows)):
            assert torch.equal(ops.linear_amx(x[lo:hi], ops.pack_linear_amx(w), fan_out, b), out[lo:hi])
            assert torch.equal(ops.linear_silu_mul_amx(x[lo:hi], ops.pack_gate_up_amx(wg), fan_out), g[lo:hi])
    if rows > 128:  # against the panel-major path, 100 rows at a time
        parts = [ops.linear_amx(x[i : i + 100], ops.pack_linear_amx(w), fan_out, b) for i in range(0, rows, 100)]
        assert torch.equal(out, torch.cat(parts))
        gate_up = ops.pack_gate_up_amx(wg)
        parts = [ops.linear_silu_mul_amx(x[i : i + 100], gate_up, fan_out) for i in range(0, rows, 100)]
        assert torch.equal(g, torch.cat(parts))


@needs_bf16_panels
def test_bf16_panel_linear_edges_refusals_and_the_large_batch_path(monkeypatch):
    from chunkattn.model.layers import GateUpLinear, Linear

    ops = torch.ops.chunkattn_layers
    assert torch.equal(ops.linear_amx(torch.randn(5, 0).bfloat16(), ops.pack_linear_amx(torch.randn(7, 0).bfloat16()),
                                      7, None), torch.zeros(5, 7, dtype=torch.bfloat16))
    assert ops.linear_amx(torch.randn(5, 3).bfloat16(), ops.pack_linear_amx(torch.randn(0, 3).bfloat16()), 0,
                          None).shape == (5, 0)
    assert ops.linear_amx(torch.randn(0, 3).bfloat16(), ops.pack_linear_amx(torch.randn(4, 3).bfloat16()), 4,
                          None).shape == (0, 4)
    packed = ops.pack_linear_amx(torch.randn(40, 64).bfloat16())  # 2 panels of 32, 2 steps of 32
    with pytest.raises(RuntimeError, match="packed must be pack_linear_amx"):
        ops.linear_amx(torch.randn(3, 64).bfloat16(), packed, 65, None)  # 3 panels' worth
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_amx(torch.randn(3, 96).bfloat16(), packed, 40, None)  # K mismatch
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        ops.linear_amx(torch.randn(3, 64), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear_amx(torch.randn(3, 64).bfloat16(), packed, 40, torch.randn(40))
    with pytest.raises(RuntimeError, match=r"\[gate; up\]"):
        ops.pack_gate_up_amx(torch.randn(7, 16).bfloat16())
    if not native.amx_linear_supported():  # vdpbf16ps: the panels at every row count, whatever K
        monkeypatch.setattr(Linear, "AMX_ALL_ROWS_MAX_K", 32)  # K = 64 would be a long K on tiles
        torch.manual_seed(5)
        lin, gate_up = Linear(64, 40, bias=True).bfloat16(), GateUpLinear(64, 24).bfloat16()
        x = torch.randn(300, 64).bfloat16()
        with torch.inference_mode():
            for m in (lin, gate_up):
                torch.nn.init.normal_(m.weight, std=0.1)
                assert m.prepack() and m.packed is not None and m.panel_max_rows() == sys.maxsize
            # 300 rows still go through the panels (bit-equal to the op), not F.linear
            assert torch.equal(lin(x), ops.linear_amx(x, lin.packed.tensor, 40, lin.bias))
            assert torch.equal(gate_up(x), ops.linear_silu_mul_amx(x, gate_up.packed.tensor, 24))
        return
    # above panel_max_rows the AMX layers use F.linear (oneDNN's large-matrix kernels): the same values either side
    monkeypatch.setattr(Linear, "AMX_ALL_ROWS_MAX_K", 32)  # K = 64 is then a long K
    monkeypatch.setattr(Linear, "AMX_MIN_ROWS_LIMIT", 8)
    monkeypatch.setattr(Linear, "AMX_BLOCK_BYTES", 8 * 2 * 64)  # 8 rows of K = 64
    torch.manual_seed(5)
    lin, gate_up = Linear(64, 40, bias=True).bfloat16(), GateUpLinear(64, 24).bfloat16()
    for m in (lin, gate_up):
        torch.nn.init.normal_(m.weight, std=0.1)
        assert m.prepack() and m.packed is not None and m.packed.kind == "bf16-panels"
    x = torch.randn(20, 64).bfloat16()
    with torch.inference_mode():
        for m in (lin, gate_up):
            assert m.panel_max_rows() == 8
            small, large = m(x[:8]), m(x)  # 8 rows: the AMX panels; 20: F.linear
            assert rel(small.double(), large[:8].double()) < 1e-2
