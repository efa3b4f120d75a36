"""Shared test helpers: deterministic K/V per token prefix, scenario builders, tolerance table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import chunkattn
from chunkattn import PrefixKVCache

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
