"""Shared test helpers: deterministic K/V per token prefix, scenario builders, tolerance table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

import chunkattn
from chunkattn import PrefixKVCache

if TYPE_CHECKING:
    from chunkattn.model.quant import Blocks

# ||out - ref|| / ||ref|| bounds per storage dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block, restored after: kernels split their work by thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def prefix_kv(tokens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """K/V that depend only on each token's prefix, as a real model's would: ``[len, Hkv, d]`` each.

    Sharing K/V between sequences is valid exactly when their prefixes agree, so a wrong row shows up.
    """
    h = 7
    ks, vs = [], []
    base = torch.arange(num_kv_heads * head_dim, dtype=torch.float64).view(num_kv_heads, head_dim)
    for t in tokens:
        h = (h * 1000003 + t + 1) % 2147483647
        ks.append(torch.sin(base * 0.37 + (h % 1009)))
        vs.append(torch.cos(base * 0.11 + (h % 1013)))
    if not ks:
        return (torch.zeros(0, num_kv_heads, head_dim, dtype=dtype),) * 2
    return torch.stack(ks).to(dtype), torch.stack(vs).to(dtype)


def store_prefix_kv(cache: PrefixKVCache, batch: chunkattn.Batch) -> None:
    """Store every layer's K/V of ``batch`` as ``prefix_kv`` (layer l adds l)."""
    parts_k, parts_v = [], []
    for seq, n in zip(batch.seqs, batch.num_new):
        k, v = prefix_kv(list(seq.token_ids), cache.num_kv_heads, cache.head_dim, cache.dtype)
        parts_k.append(k[len(k) - n :])
        parts_v.append(v[len(v) - n :])
    k, v = torch.cat(parts_k), torch.cat(parts_v)
    for layer in range(cache.num_layers):
        cache.store(layer, batch, (k + layer).to(cache.dtype), (v - layer).to(cache.dtype))


def assert_kv_intact(cache: PrefixKVCache) -> None:
    """Every live sequence reads back exactly the K/V its prefixes define."""
    for seq in cache.sequences:
        rows = cache.sequence_kv_rows(seq)
        k, v = prefix_kv(list(seq.token_ids), cache.num_kv_heads, cache.head_dim, cache.dtype)
        for layer in range(cache.num_layers):
            assert torch.equal(cache.k_cache[layer][rows], (k + layer).to(cache.dtype)), f"K of {seq} corrupted"
            assert torch.equal(cache.v_cache[layer][rows], (v - layer).to(cache.dtype)), f"V of {seq} corrupted"


def trie_size(token_lists: list[list[int]]) -> int:
    """Distinct non-empty prefixes among ``token_lists``: the tokens a token-exact tree stores."""
    return len({tuple(t[: i + 1]) for t in token_lists for i in range(len(t))})


def check_attention(cache: PrefixKVCache, batch: chunkattn.Batch, num_q_heads: int, backend: str,
                    tol: float | None = None, scale: float | None = None) -> float:
    """Random q; ``backend`` against ``reference`` on every layer, LSE too. Returns the worst rel. error."""
    tol = REL_TOL[cache.dtype] if tol is None else tol
    worst = 0.0
    for layer in range(cache.num_layers):
        q = torch.randn(batch.num_new_tokens, num_q_heads, cache.head_dim, device=cache.device).to(cache.dtype)
        ref, ref_lse = chunkattn.attention(q, cache, batch, layer, backend="reference", return_lse=True,
                                           scale=scale)
        out, lse = chunkattn.attention(q, cache, batch, layer, backend=backend, return_lse=True, scale=scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == q.shape[:2]
        err = rel_err(out, ref)
        assert err <= tol, f"{backend} vs reference: rel. error {err:.3g} > {tol}"
        assert rel_err(lse, ref_lse) <= max(tol, 1e-5)
        worst = max(worst, err)
    return worst


def run_model(model, cache: PrefixKVCache, batch: chunkattn.Batch, ids: torch.Tensor, pos: torch.Tensor,
              backend: str = "torch") -> torch.Tensor:
    """One forward pass of ``model`` over ``batch``'s new tokens, attention planned once as the engine does."""
    from chunkattn.attention import get_backend

    attn = get_backend(backend, cache)
    attn.plan(batch)
    return model(ids, pos, attn)


def tiny_model(vocab: int = 101, eos: int | None = None, seed: int = 1234, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu", std: float = 0.3, **shape):
    """A 2-layer random Llama (GQA 4/2, head_dim 16; ``shape``: other LlamaConfig fields) with sharp logits (weights
    of std ``std``) in ``dtype`` on ``device``, and its HF config dict."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from chunkattn.model import LoadedModel, ModelConfig, build_model

    torch.manual_seed(seed)
    fields = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, **shape}
    cfg = LlamaConfig(vocab_size=vocab, eos_token_id=eos, **fields)
    hf = HFLlama(cfg)
    for p in hf.parameters():  # larger weights: sharper, less tie-prone logits
        p.data.normal_(0, std)
    mc = ModelConfig.from_hf(cfg.to_dict())
    return LoadedModel(build_model(mc, dict(hf.state_dict()), dtype, device), None, mc, "tiny", cfg.to_dict())


def write_checkpoint(directory, hf_config: dict, weights: dict[str, torch.Tensor], shards: int = 1) -> None:
    """A Hugging Face model directory: ``config.json``, ``weights`` in safetensors (``shards`` > 1: that many files
    and ``model.safetensors.index.json``, as large checkpoints come) and a two-word tokenizer."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    names = list(weights)
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
            save_file({n: weights[n] for n in part}, str(directory / file))
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")))
    tok.save_pretrained(str(directory))


def q5_1_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as q5_1 blocks (GGUF's Q5_1 and Q5_K, read from files only): ``d = (max - min) / 31``,
    ``m = min`` as float16, values 0..31 (both extremes in every block)."""
    from chunkattn.model.quant import Blocks

    n, k = w.shape
    x = w.float().view(n, k // 32, 32)
    lo, hi = x.amin(-1), x.amax(-1)
    d, m = ((hi - lo) / 31).half(), lo.half()
    q = ((x - m.float()[..., None]) * torch.where(d == 0, 0, 1 / d.float())[..., None]).round().clamp(0, 31)
    return Blocks.from_values("q5_1", q.to(torch.uint8).view(n, k), d, m)


def iq4_nl_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as iq4_nl blocks (GGUF's IQ4_NL and IQ4_XS, read from files only): ``d`` the block's
    largest |w| / 127 as float16 (negative for every third block), each value the nearest of the 16 codebook
    indices; every index occurs in the first block."""
    from chunkattn.model.quant import IQ4_VALUES, Blocks

    n, k = w.shape
    x = w.float().view(n, k // 32, 32)
    sign = torch.where(torch.arange(n * k // 32).view(n, k // 32) % 3 == 2, -1.0, 1.0)
    d = (x.abs().amax(-1) / 127 * sign).half()
    book = torch.tensor(IQ4_VALUES, dtype=torch.float32)
    q = (x * torch.where(d == 0, 0, 1 / d.float())[..., None])[..., None].sub(book).abs().argmin(-1)
    q.view(-1, 32)[0, :16] = torch.arange(16)
    return Blocks.from_values("iq4_nl", q.to(torch.uint8).view(n, k), d, None)


def q4x16_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as q4x16 blocks (GGUF's Q3_K, read from files only): per 16 weights ``d`` =
    (max - min) / 15 and ``m`` = min as float16, negated for every third sub-block (``d < 0``, ``m`` = max, as Q3_K's
    signed scales give), values 0..15 (both extremes in every sub-block)."""
    return _x16_blocks(w, "q4x16", 15)


def q2x16_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as q2x16 blocks (GGUF's Q2_K, read from files only): q4x16_blocks' choices with values 0..3
    (d = (max - min) / 3)."""
    return _x16_blocks(w, "q2x16", 3)


def _x16_blocks(w: torch.Tensor, qtype: str, top: int):
    """q4x16_blocks / q2x16_blocks: values 0..top, a scale and an offset per 16 weights."""
    from chunkattn.model.quant import Blocks

    n, k = w.shape
    x = w.float().view(n, k // 16, 16)
    lo, hi = x.amin(-1), x.amax(-1)
    flip = torch.arange(n * k // 16).view(n, k // 16) % 3 == 2
    d = torch.where(flip, lo - hi, hi - lo).div(top).half()
    m = torch.where(flip, hi, lo).half()
    q = ((x - m.float()[..., None]) * torch.where(d == 0, 0, 1 / d.float())[..., None]).round().clamp(0, top)
    return Blocks.from_values(qtype, q.to(torch.uint8).view(n, k), d, m)


def q3x16_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as q3x16 blocks (GGUF's Q3_K, read from files only): per 16 weights ``d`` = their largest
    |w| / 4 as float16 (negative for every third sub-block, as Q3_K's signed scales give) and values ``q + 4`` in
    0..7 (Q3_K's q in -4..3; the extremes 0 and 7 in every block's first half)."""
    from chunkattn.model.quant import Blocks

    n, k = w.shape
    x = w.float().view(n, k // 16, 16)
    sign = torch.where(torch.arange(n * k // 16).view(n, k // 16) % 3 == 2, -1.0, 1.0)
    d = (x.abs().amax(-1) / 4 * sign).half()
    q = (x * torch.where(d == 0, 0, 1 / d.float())[..., None]).round().clamp(-4, 3) + 4
    q.view(-1, 32)[:, 0], q.view(-1, 32)[:, 1] = 0, 7
    return Blocks.from_values("q3x16", q.to(torch.uint8).view(n, k), d, None)


def q6_k_blocks(w: torch.Tensor):
    """``w`` ``[N, K]`` as q6_k blocks (GGUF's Q6_K, read from files only): a float16 scale per 16 weights (their
    largest |w| / 31.5, negative for every third sub-block, as GGUF's signed ones) and values 0..63 around 32, the
    extremes included, as llama.cpp's Q6_K holds them."""
    from chunkattn.model.quant import Blocks

    n, k = w.shape
    x = w.float().view(n, k // 16, 16)
    sign = torch.where(torch.arange(n * k // 16).view(n, k // 16) % 3 == 1, -1.0, 1.0)
    d = (x.abs().amax(-1) / 31.5 * sign).half()
    q = (x * torch.where(d == 0, 0, 1 / d.float())[..., None]).round().clamp(-32, 31) + 32
    return Blocks("q6_k", q.to(torch.uint8).view(n, k), d, None)


# -- the quantized linear kernel (chunkattn_layers.linear_quant) against float64 --------------------------------------

def quant_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gate_up: bool) -> torch.Tensor:
    """float64 ``x w^T (+ bias)``, or ``silu(gate) * up`` of its halves."""
    y = x.double() @ w.double().T
    if gate_up:
        half = w.shape[0] // 2
        y = torch.nn.functional.silu(y[:, :half]) * y[:, half:]
    return y if bias is None else y + bias.double()


def int_x(x: torch.Tensor) -> torch.Tensor:
    """float64 x as path 4 multiplies it: each block of 32 rounded (to nearest even) to integers times 2^(E - 13),
    E = floor(log2 of the block's largest |x|), clamped at -100."""
    rows, k = x.shape
    xb = x.float().view(rows, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    e = (torch.frexp(amax).exponent - 1).clamp(min=-100)
    v = torch.round(xb * torch.ldexp(torch.ones_like(amax), 13 - e)) * (amax > 0)
    assert v.abs().max() <= 16320
    return (v.double() * torch.ldexp(torch.ones_like(amax, dtype=torch.float64), e.double() - 13)).view(rows, k)


def int_x_reference(x: torch.Tensor, blocks: Blocks, bias: torch.Tensor | None, gate_up: bool) -> torch.Tensor:
    """float64 path 4: the weights (d q, d q + m, or d (q - 32)) exactly, times int_x(x)."""
    if blocks.qtype == "q6_k":
        w = blocks.d.double().repeat_interleave(16, 1) * (blocks.values().double() - 32)
        return quant_reference(int_x(x), w, bias, gate_up)
    w = blocks.d.double().repeat_interleave(32, 1) * blocks.values().double()
    if blocks.m is not None:
        w = w + blocks.m.double().repeat_interleave(32, 1)
    return quant_reference(int_x(x), w, bias, gate_up)


def silu_mul_error(pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The error bound ``[rows, I]`` of ``silu(gate) * up`` from the bounds ``pre`` ``[rows, 2 I]`` on the errors of a
    gate/up product's columns ``g`` ``[rows, 2 I]`` (float64, gate then up), through |silu'| <= 1.1."""
    half = g.shape[1] // 2
    eg, eu, gg, uu = pre[:, :half], pre[:, half:], g[:, :half], g[:, half:]
    return 1.1 * eg * uu.abs() + (torch.nn.functional.silu(gg).abs() + 1.1 * eg) * eu


def int_x_bound(x: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor, gate_up: bool) -> torch.Tensor:
    """Path 4's error against quant_reference of int_x(x): exact integer block sums, then float32 scaling and summing
    over the K / 32 blocks (each block's term off by 2^-23 of it, the running sum by 2^-24 a block), then bf16."""
    pre = x.shape[1] / 32 * 2**-22 * (x.double().abs() @ weight.double().abs().T)
    if gate_up:
        pre = silu_mul_error(pre, x.double() @ weight.double().T)
    # (an absolute slack of 1e-30 only: far below the outputs the tests make, so that tiny ones stay checked)
    return pre + ref.abs() * 2**-8 + 1e-30


def direct_terms(blocks: Blocks) -> torch.Tensor:
    """float64 ``[N, K]``: the largest term per weight of the direct path's float32 sums (path 3), the scale of its
    rounding. It sums (128 + q) x d and subtracts 128 d sum(x): terms up to 143 |d| + |m| per weight; for q8
    16 (128 + h) x d + (128 + l) x d, up to 17 * 143 |d|; q6: (128 + q) x d and 160 d sum(x), up to 351 |d|;
    q3x16: 135 |d| and 132 d sum(x), up to 267 |d|; q5: 159 |d| + |m|; iq4: its codebook value, up to 127 |d|
    (q6 and the x16 kinds: d and m per 16 weights)."""
    qtype = blocks.qtype
    size = 16 if qtype in ("q6_k", "q4x16", "q2x16", "q3x16") else 32
    terms = blocks.d.double().abs().repeat_interleave(size, 1) * (
        351 if qtype == "q6_k" else 267 if qtype == "q3x16" else 159 if qtype == "q5_1" else 127 if qtype == "iq4_nl"
        else 143 if blocks.m is not None else 17 * 143)
    if blocks.m is not None:
        terms = terms + blocks.m.double().abs().repeat_interleave(size, 1)
    return terms


def check_quant_linear(y: torch.Tensor, x: torch.Tensor, blocks: Blocks, exact: torch.Tensor, bias: torch.Tensor | None,
                       gate_up: bool, path: int) -> None:
    """Asserts that ``y``, the kernel's output of bf16 ``x`` on ``path`` (1-4, the path that ran), is within the
    float64 product's rounding bound. ``exact``: the weight dequantized (``QuantizedWeight.dequantize``). Paths 1
    and 2 round each weight to bf16 (relative 2^-9) and sum in float32; path 3 keeps the weights exact and sums
    :func:`direct_terms`; path 4 multiplies x rounded per block (:func:`int_x`): :func:`int_x_bound`."""
    rows, k = x.shape
    n = exact.shape[0]
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n // 2 if gate_up else n), (y.dtype, y.shape)
    if path == 4:
        ref = int_x_reference(x, blocks, bias, gate_up)
        err = (y.double() - ref).abs()
        bound = int_x_bound(int_x(x), exact, ref, gate_up)
        assert (err <= bound).all(), (path, float((err - bound).max()))
        return
    direct = path == 3
    weight = exact if direct else exact.bfloat16().float()
    ref = quant_reference(x, weight, bias, gate_up)
    # float32 sums of k terms: each product off by at most k * eps * sum|x term|; then the bf16 output
    summed = direct_terms(blocks) if direct else weight.double().abs()
    pre = k * 2**-23 * (x.double().abs() @ summed.T)
    if gate_up:
        pre = silu_mul_error(pre, x.double() @ weight.double().T)
    bound = pre + ref.abs() * 2**-8 + 1e-30  # (as int_x_bound's)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (path, float((err - bound).max()))
