"""GGUF files beyond Q4_0 / Q4_1 / Q8_0 (llama.cpp's popular Q4_K_M and Q5_K_M files: Q4_K, Q5_K, Q6_K, Q5_0,
Q5_1; Q3_K_M and Q2_K files: Q3_K, Q2_K) loaded without a full-precision copy: Q5_0 read into q8_0 blocks, Q4_K
into q4_1, Q5_K into q5_1, Q3_K into q3x16 and Q2_K into q2x16 blocks with the file's values (the K-quants' scale
products rounded to float16), Q5_1 and Q6_K held as themselves, the other quantized types (IQ3_S here) dequantized
to bfloat16, each tensor read alone; checked against transformers' own reader of the same file (gguf-py's
dequantization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chunkattn.model import quant
from chunkattn.model.quant import Blocks, QuantizationError, kernel_supported

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

needs_kernel = pytest.mark.skipif(not kernel_supported(), reason="the quantized kernel needs AVX512-BF16 "
                                  "(and the native build)")


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint8).reshape(*np.shape(x), 2)


def random_blocks(rng: np.random.Generator, qtype: object, n: int, k: int, scale: float = 0.02) -> np.ndarray:
    """Valid bytes of a GGUF ``qtype`` tensor ``[n, k]``: gguf-py's quantization of random weights where it has
    one, else random bytes (any bytes are values of a K-quant) with scales that give weights ~ ``scale``."""
    if qtype == T.F16:
        return (rng.standard_normal((n, k)) * scale).astype(np.float16)
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        return gguf.quants.quantize((rng.standard_normal((n, k)) * scale).astype(np.float32), qtype)
    raw = rng.integers(0, 256, (n, k // size, nbytes), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):  # block: d, dmin, 12 bytes of scales, (Q5_K: 32 bytes of fifth bits,) nibbles
        raw[..., 0:2] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 63 / 4)
        raw[..., 2:4] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 63)
    elif qtype == T.Q3_K:  # block: 32 bytes of third bits, 64 of 2-bit values, 12 of 6-bit scales, d (either sign)
        raw[..., 108:110] = _fp16_bytes(rng.uniform(-1, 1, (n, k // size)) * scale / 4 / 32)
    elif qtype in (T.IQ4_NL, T.IQ4_XS):  # block: d (either sign), (IQ4_XS: 6-bit scales,) codebook indices
        # (IQ4_XS: d not subnormal in float16, whose few bits would make every product exact: weights up to ~1)
        raw[..., 0:2] = _fp16_bytes(rng.uniform(-1, 1, (n, k // size)) * scale / 127 * (1 if size == 32 else 16))
    elif qtype == T.Q2_K:  # block: 16 bytes of 4-bit scales and offsets, 64 of 2-bit values, d, dmin
        raw[..., 80:82] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 15)
        raw[..., 82:84] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 15)
    elif qtype == T.IQ3_S:  # block: d, then grid indices, high bits, signs and 4-bit scales (db = d (1 + 2 s) <= 31 d)
        raw[..., 0:2] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 31 / 15)
    elif qtype == T.Q6_K:  # block: 128 bytes of low bits, 64 of high bits, 16 int8 scales, d
        # (scales of one sign and within 3x of each other, as quantizing real weights gives them)
        raw[..., 192:208] = rng.integers(40, 128, (n, k // size, 16), dtype=np.uint8)
        raw[..., 208:210] = _fp16_bytes(rng.uniform(0.5, 1, (n, k // size)) * scale / 127 / 16)
    else:
        raise ValueError(qtype)
    return raw.reshape(n, -1)


SHAPE = {"hidden": 256, "inter": 512, "layers": 2, "heads": 4, "kv": 2, "vocab": 96}


def write_gguf(path, types: dict, seed: int = 0) -> None:
    """A 2-layer Llama GGUF file (no tokenizer) with random weights, each matrix of ``types[(layer, part)]``,
    ``types[part]`` or Q4_K ("embd": the embeddings, Q8_0 by default)."""
    rng = np.random.default_rng(seed)
    s = SHAPE
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(s["layers"])
    w.add_context_length(512)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    w.add_rope_freq_base(10000.0)
    # a byte-level vocabulary of single characters and one merge: enough for transformers to build a tokenizer
    tokens = [chr(33 + i) for i in range(s["vocab"] - 2)] + ['!"', "<eos>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * s["vocab"])
    w.add_token_scores([0.0] * s["vocab"])
    w.add_token_merges(['! "'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(s["vocab"] - 1)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(s["hidden"])).astype(np.float32)

    w.add_tensor("token_embd.weight", random_blocks(rng, types.get("embd", T.Q8_0), s["vocab"], s["hidden"], 1.0),
                 raw_dtype=types.get("embd", T.Q8_0))
    w.add_tensor("output_norm.weight", norm())
    hd, h, i = s["hidden"] // s["heads"], s["hidden"], s["inter"]
    for layer in range(s["layers"]):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", norm())
        for part, (n, k) in (("attn_q", (h, h)), ("attn_k", (s["kv"] * hd, h)), ("attn_v", (s["kv"] * hd, h)),
                             ("attn_output", (h, h)), ("ffn_gate", (i, h)), ("ffn_up", (i, h)), ("ffn_down", (h, i))):
            qtype = types.get((layer, part), types.get(part, T.Q4_K))
            data = random_blocks(rng, qtype, n, k)
            w.add_tensor(f"blk.{layer}.{part}.weight", data, raw_dtype=None if qtype == T.F16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _q4_bound(b: Blocks) -> torch.Tensor:
    """Per weight, 2^-11 (|d q| + |m|) (+ float32 slack): how far a q4_1 block whose scale and offset were rounded
    to float16 may be from the float32 products."""
    n, k = b.shape
    d = b.d.float().repeat_interleave(32, dim=1).view(n, k)
    m = b.m.float().repeat_interleave(32, dim=1).view(n, k)
    return 2.0**-11 * (d.abs() * b.values().float() + m.abs()) * (1 + 2.0**-20) + 1e-30


def _q4x16_bound(b: Blocks) -> torch.Tensor:
    """_q4_bound of a q4x16 or q2x16 block (its scales and offsets per 16 weights)."""
    n, k = b.shape
    d = b.d.float().repeat_interleave(16, dim=1).view(n, k)
    m = b.m.float().repeat_interleave(16, dim=1).view(n, k)
    return 2.0**-11 * (d.abs() * b.values().float() + m.abs()) * (1 + 2.0**-20) + 1e-30


def _q6_bound(b: Blocks) -> torch.Tensor:
    """Per weight, 2^-11 |d (q - 32)| (+ float32 slack): a q6_k block's scale was rounded to float16 (q3x16's:
    |d (q - 4)|)."""
    n, k = b.shape
    w = b.d.float().repeat_interleave(16, dim=1).view(n, k) * (b.values().float() - (4 if b.qtype == "q3x16" else 32))
    return 2.0**-11 * w.abs() * (1 + 2.0**-20) + 1e-30


@pytest.mark.parametrize("n", [1, 7, 40])
def test_k_quants_and_q5_0_read_into_blocks_with_their_values(n, monkeypatch):
    """Q5_0 is q8_0 exactly, Q5_1 and IQ4_NL themselves exactly; Q4_K is q4_1, Q5_K q5_1 and Q2_K q2x16 within
    2^-11 of each scale and offset, Q6_K is q6_k and Q3_K q3x16 within 2^-11 of each sub-block's scale, IQ4_XS
    iq4_nl likewise (exact where the products fit in float16: power-of-two d and dmin); the q4 values stay two a
    byte in GGUF's order; read 3 rows at a time."""
    rng = np.random.default_rng(n)
    for qtype, k in ((T.Q5_0, 96), (T.Q5_1, 96), (T.Q4_K, 512), (T.Q4_K, 256), (T.Q5_K, 256), (T.Q5_K, 768),
                     (T.Q6_K, 256), (T.Q6_K, 768), (T.Q3_K, 512), (T.Q2_K, 256), (T.Q2_K, 768), (T.IQ4_NL, 96),
                     (T.IQ4_XS, 512)):
        monkeypatch.setattr(quant, "QUANTIZE_SLICE", 3 * k)
        raw = random_blocks(rng, qtype, n, k)
        ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
        b = Blocks.from_gguf(raw, qtype.name.lower(), k)
        assert b.shape == (n, k) and b.qtype == quant.gguf_held_as(qtype.name.lower())
        if qtype == T.Q5_0:
            assert torch.equal(b.dequantize(), ref) and int(b.q.min()) >= -16 and int(b.q.max()) <= 15
            continue
        if qtype == T.Q5_1:
            stored = raw.reshape(n, k // 32, 24)  # (d, m and the values as stored, 24 bytes a block)
            assert torch.equal(b.dequantize(), ref) and int(b.values().max()) <= 31
            assert np.array_equal(b.q.numpy(), stored[..., 4:].reshape(n, -1))
            assert np.array_equal(b.d.view(torch.uint8).numpy(), stored[..., 0:2].reshape(n, -1))  # (as stored)
            assert np.array_equal(b.m.view(torch.uint8).numpy(), stored[..., 2:4].reshape(n, -1))
            continue
        if qtype == T.IQ4_NL:  # (as stored: the file's d and index bytes)
            stored = raw.reshape(n, k // 32, 18)
            assert torch.equal(b.dequantize(), ref) and np.array_equal(b.q.numpy(), stored[..., 2:].reshape(n, -1))
            continue
        if qtype in (T.Q3_K, T.IQ4_XS):  # (the scale products rounded to float16)
            got = b.dequantize()
            assert ((got - ref).abs() <= 2.0**-11 * got.abs() * (1 + 2.0**-20) + 1e-30).all() and torch.equal(
                got == 0, ref == 0)
            if qtype == T.Q3_K:  # q in -4..3, held as q + 4 (3 bits); every value occurs (random bytes)
                assert set(b.values().unique().tolist()) == set(range(8)) and b.d.shape == (n, k // 16)
                assert b.m is None and b.q.shape == (n, k // 32 * 12)
                assert torch.equal(Blocks.from_values("q3x16", b.values(), b.d, None).q, b.q)
                exact = raw.copy().reshape(n, k // 256, 110)  # power-of-two d: the products fit float16, exact
                exact[..., 108:110] = _fp16_bytes(2.0 ** rng.integers(-20, -8, (n, k // 256)))
                exact = exact.reshape(n, -1)
                want = torch.from_numpy(gguf.quants.dequantize(exact, qtype).astype(np.float32))
                assert torch.equal(Blocks.from_gguf(exact, "q3_k", k).dequantize(), want)
            assert ((got - ref).abs() > 0).any()  # (rounded somewhere: not exact by accident)
            continue
        if qtype == T.Q6_K:
            err = (b.dequantize() - ref).abs()
            assert b.q.shape == (n, k) and int(b.q.max()) <= 63 and b.d.shape == (n, k // 16) and b.m is None
            assert (err <= _q6_bound(b)).all() and float(err.max()) > 0
            exact = raw.copy().reshape(n, k // 256, 210)
            exact[..., 208:210] = _fp16_bytes(2.0 ** rng.integers(-20, -8, (n, k // 256)))
            exact[..., 192:208] = rng.integers(0, 256, (n, k // 256, 16), dtype=np.uint8)  # (negative ones too)
            exact = exact.reshape(n, -1)
            ref = torch.from_numpy(gguf.quants.dequantize(exact, qtype).astype(np.float32))
            assert torch.equal(Blocks.from_gguf(exact, "q6_k", k).dequantize(), ref)
            continue
        if qtype == T.Q2_K:  # q in 0..3 (every one occurs), a scale and offset per 16
            assert set(b.values().unique().tolist()) == set(range(4)) and b.q.shape == (n, k // 4)
            assert b.d.shape == b.m.shape == (n, k // 16)
            err = (b.dequantize() - ref).abs()
            assert (err <= _q4x16_bound(b)).all() and float(err.max()) > 0
            exact = raw.copy().reshape(n, k // 256, 84)
            exact[..., 80:84] = _fp16_bytes(2.0 ** rng.integers(-20, -8, (n, k // 256, 2))).reshape(n, k // 256, 4)
            exact = exact.reshape(n, -1)
            ref = torch.from_numpy(gguf.quants.dequantize(exact, qtype).astype(np.float32))
            assert torch.equal(Blocks.from_gguf(exact, "q2_k", k).dequantize(), ref)
            continue
        err = (b.dequantize() - ref).abs()
        assert (err <= _q4_bound(b)).all() and float(err.max()) > 0  # (rounded, and not by accident exact)
        if qtype == T.Q4_K:
            assert torch.equal(Blocks.from_values("q4_1", b.values(), b.d, b.m).q, b.q)
        else:  # (random bytes: every fifth-bit pattern)
            assert int(b.values().max()) == 31 and int(b.values().min()) == 0
            assert b.q.shape == (n, k // 32 * 20)
            assert torch.equal(Blocks.from_values("q5_1", b.values(), b.d, b.m).q, b.q)
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        exact = raw.copy().reshape(n, k // 256, size)
        exact[..., 0:2] = _fp16_bytes(2.0 ** rng.integers(-20, -8, (n, k // 256)))
        exact[..., 2:4] = _fp16_bytes(2.0 ** rng.integers(-20, -8, (n, k // 256)))
        exact = exact.reshape(n, -1)
        ref = torch.from_numpy(gguf.quants.dequantize(exact, qtype).astype(np.float32))
        assert torch.equal(Blocks.from_gguf(exact, qtype.name.lower(), k).dequantize(), ref)


def test_k_quant_blocks_refuse_bad_shapes_and_scales():
    rng = np.random.default_rng(3)
    raw = random_blocks(rng, T.Q4_K, 4, 512)
    with pytest.raises(QuantizationError, match="must be"):
        Blocks.from_gguf(raw[:, :-1], "q4_k", 512)
    with pytest.raises(QuantizationError, match="must be"):
        Blocks.from_gguf(raw, "q4_k", 480)  # (not a multiple of 256)
    big = raw.copy().reshape(4, 2, 144)
    big[0, 1, 0:2] = _fp16_bytes(np.array([60000.0]))[0]  # d sc beyond float16 (sc of sub-block 0: 63)
    big[0, 1, 4] = 63
    with pytest.raises(QuantizationError, match="too large"):
        Blocks.from_gguf(big.reshape(4, -1), "q4_k", 512)
    with pytest.raises(QuantizationError, match="not read into blocks"):
        Blocks.from_gguf(raw, "iq3_s", 512)
    six = random_blocks(rng, T.Q6_K, 4, 512).reshape(4, 2, 210)
    six[1, 0, 208:210] = _fp16_bytes(np.array([1000.0]))[0]  # d sc beyond float16 (sc at least 40)
    with pytest.raises(QuantizationError, match="Q6_K scale too large"):
        Blocks.from_gguf(six.reshape(4, -1), "q6_k", 512)
    three = random_blocks(rng, T.Q3_K, 4, 512).reshape(4, 2, 110)
    three[2, 1, 108:110] = _fp16_bytes(np.array([60000.0]))[0]  # d (sc - 32) beyond float16 unless sc = 31, 32, 33
    three[2, 1, 96:108] = 0  # (every sc = 0: d (0 - 32))
    with pytest.raises(QuantizationError, match="Q3_K scale too large for float16"):
        Blocks.from_gguf(three.reshape(4, -1), "q3_k", 512)
    three[2, 1, 108:110] = _fp16_bytes(np.array([600.0]))[0]  # d (0 - 32) fits float16, its offset 4x that does not
    big = Blocks.from_gguf(three.reshape(4, -1), "q3_k", 512)  # q3x16 holds no offsets: read as it is
    want = torch.from_numpy(gguf.quants.dequantize(three.reshape(4, -1), T.Q3_K).astype(np.float32))
    assert torch.equal(big.dequantize()[2], want[2])  # (600 x -32: exact in float16)
    with pytest.raises(QuantizationError, match="too large to store its offset"):  # only as q4x16 (widened)
        big.as_q4x16()
    two = random_blocks(rng, T.Q2_K, 4, 512).reshape(4, 2, 84)
    two[1, 1, 82:84] = _fp16_bytes(np.array([np.inf]))[0]  # dmin
    with pytest.raises(QuantizationError, match="Q2_K scale too large for float16 \\(or not finite\\)"):
        Blocks.from_gguf(two.reshape(4, -1), "q2_k", 512)
    xs = random_blocks(rng, T.IQ4_XS, 4, 512).reshape(4, 2, 136)
    xs[3, 0, 0:2] = _fp16_bytes(np.array([np.nan]))[0]
    with pytest.raises(QuantizationError, match="IQ4_XS scale too large for float16 \\(or not finite\\)"):
        Blocks.from_gguf(xs.reshape(4, -1), "iq4_xs", 512)


def _reference(path):
    """transformers' reading of the file: its config and every tensor dequantized to float32 by gguf-py."""
    from transformers import AutoConfig
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    with torch.device("meta"):
        skeleton = HFLlama(AutoConfig.for_model(**cfg))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return cfg, {k: torch.as_tensor(v).float() for k, v in tensors.items()}


# layer 0: q F16 and k Q4_K beside a Q6_K v (the fused q/k/v dequantized; q's rows reordered as read), o IQ3_S
# (dequantized), gate Q4_1 beside up Q4_K (q4_1 both), down Q5_K (q5_1); layer 1: q/k Q5_0 beside a Q8_0 v
# (q8_0 all), gate/up Q2_K (q2x16) and down Q3_K (q3x16), o Q5_1; the embeddings Q6_K
TYPES = {(0, "attn_q"): T.F16, (0, "attn_v"): T.Q6_K, (0, "attn_output"): T.IQ3_S, (0, "ffn_gate"): T.Q4_1,
         (0, "ffn_down"): T.Q5_K,
         (1, "attn_q"): T.Q5_0,
         (1, "attn_k"): T.Q5_0,
         (1, "attn_v"): T.Q8_0, (1, "attn_output"): T.Q5_1, (1, "ffn_gate"): T.Q2_K, (1, "ffn_up"): T.Q2_K,
         (1, "ffn_down"): T.Q3_K, "embd": T.Q6_K}


def test_a_k_quant_file_is_read_tensor_by_tensor_into_blocks(tmp_path, caplog, monkeypatch):
    """Each matrix of a Q4_K_M-like file comes back under its Hugging Face name, rows in transformers' order (q/k
    un-permuted): Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q5_1 as blocks of the file's values, Q4_K, Q5_K, Q6_K, Q3_K and
    Q2_K within the float16 rounding of their scales; IQ3_S and the norms in bfloat16 as transformers reads them;
    the memory bound counts exactly what is held, plus one matrix."""
    from chunkattn.model.loader import _gguf_blocks_bytes, _GGUFLayout, gguf_blocks

    path = tmp_path / "kq.gguf"
    write_gguf(path, TYPES)
    cfg, ref = _reference(path)
    monkeypatch.setattr(quant, "QUANTIZE_SLICE", 3 * 256)  # (3 rows of K = 256 at a time, 1.5 of K = 512)
    with caplog.at_level("INFO", logger="chunkattn"):
        dense, blocks = gguf_blocks(path, cfg, torch.bfloat16)
    assert "1 IQ3_S tensor dequantized to bfloat16" in caplog.text and "Q6_K tensor" not in caplog.text
    assert "Q2_K tensor" not in caplog.text and "Q3_K tensor" not in caplog.text
    assert "Q5_K tensor" not in caplog.text and "Q5_1 tensor" not in caplog.text
    assert set(dense) | set(blocks) == set(ref) and not set(dense) & set(blocks)
    for name, w in dense.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref[name].bfloat16()), name
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    stored = {f"layers.{layer}.{hf[part]}": TYPES.get((layer, part), T.Q4_K) for layer in (0, 1) for part in hf}
    stored["embed_tokens"] = TYPES["embd"]
    kinds = {}
    for name, b in blocks.items():
        got, want = b.dequantize(), ref[name]
        short = name.removeprefix("model.").removesuffix(".weight")
        kinds[short] = b.qtype
        if stored[short] in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K):
            bound = {T.Q6_K: _q6_bound, T.Q3_K: _q6_bound, T.Q2_K: _q4x16_bound}.get(stored[short], _q4_bound)(b)
            assert ((got - want).abs() <= bound).all() and float((got - want).abs().max()) > 0, name
        else:  # Q4_1, Q5_0, Q5_1, Q8_0
            assert torch.equal(got, want), name
    assert kinds == {**{f"layers.0.{p}": "q4_1" for p in ("self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")},
                     **{f"layers.1.{p}": "q8_0" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
                     **{f"layers.1.{p}": "q2x16" for p in ("mlp.gate_proj", "mlp.up_proj")},
                     "layers.1.mlp.down_proj": "q3x16",
                     "layers.0.mlp.down_proj": "q5_1", "layers.1.self_attn.o_proj": "q5_1",
                     **{p: "q6_k" for p in ("layers.0.self_attn.v_proj", "embed_tokens")}}
    held = sum(b.q.nbytes + b.d.nbytes + (0 if b.m is None else b.m.nbytes) for b in blocks.values())
    held += sum(w.nbytes for w in dense.values())
    largest = max([b.q.nbytes + b.d.nbytes + (0 if b.m is None else b.m.nbytes) for b in blocks.values()]
                  + [w.nbytes for w in dense.values()])
    reader = gguf.GGUFReader(str(path))
    assert _gguf_blocks_bytes(reader, torch.bfloat16, _GGUFLayout.of(reader, cfg), None) == held + largest


def _prefill_logits(model, config, dtype: torch.dtype) -> torch.Tensor:
    """float32 logits of ``model``'s prefill of a fixed 9-token prompt, its K/V in ``dtype``."""
    from chunkattn import PrefixKVCache
    from chunkattn.attention import get_backend

    ids = torch.tensor([3, 17, 42, 5, 88, 60, 1, 9, 33])
    cache = PrefixKVCache(config.num_layers, config.num_kv_heads, config.head_dim, chunk_size=16, max_tokens=64,
                          dtype=dtype)
    seq = cache.add_sequence(ids.tolist())
    attn = get_backend("auto", cache)
    attn.plan(cache.extend([seq], [ids.tolist()]))
    return model(ids, torch.arange(len(ids)), attn).float()


@needs_kernel
@pytest.mark.parametrize(("seed", "q0"), [(1, T.F16), (2, T.Q4_K)])
def test_a_k_quant_model_runs_quantized_close_to_its_dequantized_values(tmp_path, caplog, seed, q0):
    """Built into a model: q/k/v of layer 0 dense where its q is F16 (beside quantized k and v: logged), as parts
    where it is Q4_K (q and k one q4_1 product, the Q6_K v another, as in llama.cpp's Q4_K_M files); layer 0's o
    dense (IQ3_S); the others quantized (q4_1 from Q4_K / Q4_1, q5_1 from Q5_K / Q5_1, q8_0 from Q5_0 / Q8_0,
    q2x16 from Q2_K, q3x16 from Q3_K, q6_k from Q6_K: the embeddings and the tied head one pack); prefill logits
    match those of the model built in float32 from the blocks' values and from transformers' float32 reading (the
    K-quants' float16 scale products too)."""
    from chunkattn.model.layers import Embedding, Linear
    from chunkattn.model.loader import build_model, gguf_blocks
    from chunkattn.model.registry import config_from_hf

    path = tmp_path / "kq.gguf"
    write_gguf(path, {**TYPES, (0, "attn_q"): q0}, seed=seed)
    cfg, ref = _reference(path)
    config = config_from_hf(cfg)
    dense, blocks = gguf_blocks(path, cfg, torch.bfloat16)
    ours = {**dense, **{name: b.dequantize() for name, b in blocks.items()}}  # (build_model empties both)
    with caplog.at_level("INFO", logger="chunkattn"):
        q = build_model(config, dense, torch.bfloat16, "cpu", blocks=blocks)
    parts = q0 == T.Q4_K
    assert ("model.layers.0.self_attn.qkv_proj.weight: " + ("its parts multiplied apart (q4_1+q6_k)" if parts else
            "dequantized (some parts are not quantized)")) in caplog.text
    qtypes = {name: m.quant.qtype for name, m in q.named_modules()
              if isinstance(m, (Linear, Embedding)) and m.quant}
    assert qtypes == {**({"model.layers.0.self_attn.qkv_proj": "q4_1+q6_k"} if parts else {}),
                      "model.layers.0.mlp.gate_up_proj": "q4_1", "model.layers.0.mlp.down_proj": "q5_1",
                      "model.layers.1.self_attn.qkv_proj": "q8_0", "model.layers.1.self_attn.o_proj": "q5_1",
                      "model.layers.1.mlp.gate_up_proj": "q2x16", "model.layers.1.mlp.down_proj": "q3x16",
                      "model.embed_tokens": "q6_k", "lm_head": "q6_k"}
    assert q.lm_head.quant is q.model.embed_tokens.quant  # (tied: one pack)
    outs = [_prefill_logits(q, config, torch.bfloat16),
            _prefill_logits(build_model(config, ours, torch.float32, "cpu"), config, torch.float32),
            _prefill_logits(build_model(config, dict(ref), torch.float32, "cpu"), config, torch.float32)]
    scale = outs[2].abs().max()
    same_values, from_file = [float((outs[0] - o).abs().max() / scale) for o in outs[1:]]
    # (measured 0.2-0.3%: bfloat16 activations; a wrong value order, scale or row permutation moves logits by
    # their size)
    assert scale > 1 and same_values < 0.01 and from_file < 0.01, (same_values, from_file)


@needs_kernel
def test_q2_k_beside_q3_k_fuses_as_gate_up_and_stays_apart_in_qkv(tmp_path):
    """llama.cpp's Q2_K files put Q3_K beside Q2_K: a gate/up of the two is one q4x16 product (the Q2_K part's
    values widened, and the Q3_K part's offsets stored: not the projection dequantized); a q/k/v keeps its Q2_K q / k
    (one q2x16 product) apart from a Q3_K v (q3x16); the model's logits match float32 built from the same values."""
    from chunkattn.model.layers import Embedding, Linear
    from chunkattn.model.loader import build_model, gguf_blocks
    from chunkattn.model.registry import config_from_hf

    path = tmp_path / "q2.gguf"
    write_gguf(path, {"attn_q": T.Q2_K, "attn_k": T.Q2_K, "attn_v": T.Q3_K, "attn_output": T.Q3_K,
                      "ffn_gate": T.Q2_K, "ffn_up": T.Q3_K, "ffn_down": T.Q2_K, "embd": T.Q2_K}, seed=4)
    cfg, _ = _reference(path)
    config = config_from_hf(cfg)
    dense, blocks = gguf_blocks(path, cfg, torch.bfloat16)
    ours = {**dense, **{name: b.dequantize() for name, b in blocks.items()}}
    q = build_model(config, dense, torch.bfloat16, "cpu", blocks=blocks)
    qtypes = {name: m.quant.qtype for name, m in q.named_modules() if isinstance(m, (Linear, Embedding)) and m.quant}
    for layer in (0, 1):
        assert qtypes[f"model.layers.{layer}.self_attn.qkv_proj"] == "q2x16+q3x16"
        assert qtypes[f"model.layers.{layer}.self_attn.o_proj"] == "q3x16"
        assert qtypes[f"model.layers.{layer}.mlp.gate_up_proj"] == "q4x16"
        assert qtypes[f"model.layers.{layer}.mlp.down_proj"] == "q2x16"
    assert qtypes["model.embed_tokens"] == "q2x16" and q.lm_head.quant is q.model.embed_tokens.quant
    outs = [_prefill_logits(q, config, torch.bfloat16),
            _prefill_logits(build_model(config, ours, torch.float32, "cpu"), config, torch.float32)]
    scale = outs[1].abs().max()
    assert scale > 1 and float((outs[0] - outs[1]).abs().max() / scale) < 0.01


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_quantizing_a_gguf_file_at_load_quantizes_each_tensor_as_read(qtype, tmp_path):
    """--quantization on a GGUF file quantizes each planned weight from the file's values as it is read (never the
    file dequantized whole): blocks equal to quantizing transformers' reading of the same tensor, bit for bit,
    except where the file already holds what was asked (Q8_0 / Q5_0 for q8_0, Q4_0 for q4_0, Q4_0 / Q4_1 / Q4_K for
    q4_1), kept as read; the embeddings at q8_0 under a 4-bit type; the memory bound counts the planned types."""
    from chunkattn.model.loader import _gguf_blocks_bytes, _GGUFLayout, gguf_blocks, quantization_plan
    from chunkattn.model.quant import quantize
    from chunkattn.model.registry import config_from_hf

    path = tmp_path / "kq.gguf"
    write_gguf(path, {**TYPES, (0, "ffn_gate"): T.Q4_0})
    cfg, ref = _reference(path)
    plan = quantization_plan(config_from_hf(cfg), qtype)
    reader = gguf.GGUFReader(str(path))
    layout = _GGUFLayout.of(reader, cfg)
    stored = {hf: reader.get_tensor(i).tensor_type for i in range(len(reader.tensors))
              for hf in [layout.names.get(reader.get_tensor(i).name)] if hf}
    dense, blocks = gguf_blocks(path, cfg, torch.bfloat16, reader, plan, layout)
    assert set(blocks) == {n for n in plan if n in ref} and set(dense) == set(ref) - set(blocks)
    kept = {"q8_0": (T.Q8_0, T.Q5_0), "q4_0": (T.Q4_0,), "q4_1": (T.Q4_0, T.Q4_1, T.Q4_K)}[qtype]
    for name, b in blocks.items():
        assert b.qtype in (plan[name], "q4_0" if plan[name] == "q4_1" else plan[name]), name
        if stored[name] in kept and stored[name] == T.Q4_K:  # (kept: its values, scales rounded to float16)
            assert ((b.dequantize() - ref[name]).abs() <= _q4_bound(b)).all(), name
        elif stored[name] in kept:
            assert torch.equal(b.dequantize(), ref[name]), name
        else:
            want = quantize(ref[name], plan[name])
            assert torch.equal(b.q, want.q) and torch.equal(b.d, want.d), name
            assert (b.m is None) == (want.m is None) and (b.m is None or torch.equal(b.m, want.m)), name
    assert plan["model.embed_tokens.weight"] == "q8_0"
    held = sum(b.q.nbytes + b.d.nbytes + (0 if b.m is None else b.m.nbytes) for b in blocks.values())
    held += sum(w.nbytes for w in dense.values())
    need = _gguf_blocks_bytes(reader, torch.bfloat16, layout, plan)
    assert held < need <= held + max(w.numel() * 2 for w in ref.values())


@needs_kernel
def test_load_model_on_a_k_quant_file_and_its_weight_cache(tmp_path, monkeypatch, caplog):
    """load_model end to end on a Q4_K_M-like file (with a tokenizer): quantization "auto" keeps the blocks and
    caches them, a second load reads the cache (the same packs), "q4_0" caches its own entry; a file too large for
    the memory available is refused before its tensors are read, naming the bytes of what it would hold."""
    from chunkattn import InsufficientMemoryError
    from chunkattn.model import load_model, loader
    from chunkattn.model.layers import Embedding, Linear
    from chunkattn.model.loader import weight_bytes

    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "kq.gguf"
    write_gguf(path, {**TYPES, (0, "attn_q"): T.Q4_K})  # (layer 0's q/k/v: Q4_K q and k beside a Q6_K v)

    def same_packs(x, y) -> bool:  # (a projection of parts: each part's)
        xs, ys = getattr(x, "parts", [x]), getattr(y, "parts", [y])
        return len(xs) == len(ys) and all(torch.equal(p.packed, q.packed) for p, q in zip(xs, ys))

    def packs(m):
        return {n: x.quant for n, x in m.model.named_modules() if isinstance(x, (Linear, Embedding)) and x.quant}

    parses = []
    real_reader, real_init = gguf.GGUFReader, gguf.GGUFReader.__init__

    def counting_init(self, *args, **kwargs):
        parses.append(args[0] if args else kwargs.get("path"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_init)
    with caplog.at_level("INFO", logger="chunkattn"):
        first = load_model(path, dtype=torch.bfloat16)
        assert "cached the blocks of kq.gguf" in caplog.text
    # the file parsed once: transformers' readings of its config and tokenizer are given chunkattn's parse
    assert len(parses) == 1 and gguf.GGUFReader is real_reader, parses
    monkeypatch.setattr(gguf.GGUFReader, "__init__", real_init)
    with caplog.at_level("INFO", logger="chunkattn"):
        caplog.clear()
        second = load_model(path, dtype=torch.bfloat16)
        assert "reading kq.gguf's blocks from the weight cache" in caplog.text
        caplog.clear()
        q4 = load_model(path, dtype=torch.bfloat16, quantization="q4_0")
        assert "cached the blocks of kq.gguf" in caplog.text  # (its own entry, beside the first)
    a, b = packs(first), packs(second)
    assert a.keys() == b.keys() and len(a) == 9, sorted(a)
    assert a["model.layers.0.self_attn.qkv_proj"].qtype == "q4_1+q6_k"
    assert all(same_packs(a[n], b[n]) for n in a)
    # the resident bytes count each pack once (the tied head's is the embeddings')
    assert weight_bytes(first.model)["quantized"] == sum(p.nbytes for n, p in a.items() if n != "lm_head")
    kinds = {n: p.qtype for n, p in packs(q4).items()}
    assert kinds["model.embed_tokens"] == "q8_0" and kinds["model.layers.0.self_attn.qkv_proj"] == "q4_0"
    assert len(list((tmp_path / "cache" / "gguf").glob("*-blocks-v*"))) == 1
    assert len(list((tmp_path / "cache" / "gguf").glob("*-blocks-q4_0-v*"))) == 1
    ids = first.tokenizer.encode("abc!")
    assert len(ids) >= 3 and first.config.vocab_size == SHAPE["vocab"]
    entry, = (tmp_path / "cache" / "gguf").glob("*-blocks-v*")
    (entry / "weights.safetensors").unlink()  # a damaged entry: read the file again, and cache it again
    with caplog.at_level("INFO", logger="chunkattn"):
        caplog.clear()
        again = load_model(path, dtype=torch.bfloat16)
        assert "is unreadable" in caplog.text and "cached the blocks of kq.gguf" in caplog.text
    assert (entry / "weights.safetensors").exists()
    c = packs(again)
    assert c.keys() == a.keys() and all(same_packs(a[n], c[n]) for n in a)
    monkeypatch.setenv("CHUNKATTN_WEIGHT_CACHE", "0")
    monkeypatch.setattr(loader, "memory_shortfall", lambda need, device, what: (f"only {need - 1} fit", need - 1))
    with pytest.raises(InsufficientMemoryError, match=r"loading kq\.gguf's weights quantized \(read tensor by tensor, "
                       r"then packed a matrix at a time\) takes at least 0\.0 GiB, but only \d+ fit: use "
                       r"--quantization q4_0 \(or a smaller model\)$"):
        load_model(path, dtype=torch.bfloat16)
    with pytest.raises(InsufficientMemoryError, match=r"but only \d+ fit: use a smaller model$"):
        load_model(path, dtype=torch.bfloat16, quantization="q4_1")


def test_the_shared_parse_answers_only_its_file_and_is_undone(tmp_path):
    """_parsed_once hands its reader to readings of its file (by position or keyword, through a symlink), parses any
    other file as before, and puts gguf.GGUFReader back, after an exception too."""
    from chunkattn.model.loader import _parsed_once

    path, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(path, {})
    write_gguf(other, {}, seed=1)
    (tmp_path / "link.gguf").symlink_to(path)
    real = gguf.GGUFReader
    reader = real(str(path))
    with pytest.raises(RuntimeError, match="inside"), _parsed_once(path, reader):
        assert gguf.GGUFReader(str(path)) is reader and gguf.GGUFReader(path=str(path)) is reader
        assert gguf.GGUFReader(str(tmp_path / "link.gguf")) is reader
        fresh = gguf.GGUFReader(str(other))
        assert fresh is not reader and type(fresh) is real and len(fresh.tensors) == len(reader.tensors)
        raise RuntimeError("inside")
    assert gguf.GGUFReader is real
