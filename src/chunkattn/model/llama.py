"""A Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) in plain PyTorch; attention through an
:class:`~chunkattn.attention.AttentionBackend` over the prefix cache.

The q/k/v projections are one fused ``qkv_proj`` and gate/up one ``gate_up_proj`` (wider products run
faster); :attr:`LlamaForCausalLM.packed_modules` maps them to Hugging Face's separate weights, which the
loader concatenates and :meth:`LlamaForCausalLM.hf_state_dict` splits back.
"""

from __future__ import annotations

import torch
from torch import nn

from chunkattn.attention.backend import AttentionBackend
from chunkattn.model.config import ModelConfig
from chunkattn.model.layers import (
    Embedding,
    GateUpLinear,
    Linear,
    RMSNorm,
    WatchedModule,
    apply_rope_,
    rope_cos_sin,
    rope_inv_freq,
    runs_own_forward,
)
from chunkattn.model.native_layers import NativeLayers


class Attention(WatchedModule):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # [N, (H + 2 Hkv) d]
        apply_rope_(qkv, cos, sin, self.num_heads + self.num_kv_heads, d)  # q and k, in place
        q = qkv[:, : self.q_size].view(n, self.num_heads, d)  # [N, H, d]
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, d)  # [N, Hkv, d]
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, d)
        out = attn.forward(self.layer, q, k, v)  # [N, H, d]
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(WatchedModule):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size)  # SiLU-and-multiply included
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))  # [N, hidden] -> [N, I] -> [N, hidden]


class DecoderLayer(WatchedModule):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings for layer 0, then ``residual`` is None); returns
        this layer's output and the residual stream before it (added by the next norm)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaBody(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder. ``forward`` runs one engine step's new tokens (any mix of prefill and decode)."""

    # fused module -> the Hugging Face modules it concatenates (along the output dimension), in order
    packed_modules: dict[str, tuple[str, ...]] = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }
    inv_freq: torch.Tensor  # [head_dim / 2] rotary inverse frequencies

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.native_layers = NativeLayers()  # the layer loop in one native call where it applies

    def native_layer_parts(self) -> list[tuple[nn.Module, ...]] | None:
        """Each layer's (input_layernorm, qkv_proj, o_proj, post_attention_layernorm, gate_up_proj, down_proj),
        the modules :mod:`chunkattn.model.native_layers` runs in one native call; None when a layer is not this
        file's (a subclass or a ``forward`` set on the instance may compute differently) or layer ``i`` does not
        attend on the cache's layer ``i``."""
        parts: list[tuple[nn.Module, ...]] = []
        for i, layer in enumerate(self.model.layers):
            if not (runs_own_forward(layer, DecoderLayer) and runs_own_forward(layer.self_attn, Attention)
                    and runs_own_forward(layer.mlp, MLP) and layer.self_attn.layer == i):
                return None
            attn, mlp = layer.self_attn, layer.mlp
            parts.append((layer.input_layernorm, attn.qkv_proj, attn.o_proj, layer.post_attention_layernorm,
                          mlp.gate_up_proj, mlp.down_proj))
        return parts

    def prepack(self, batch_hint: int = 32, drop_dense: bool = False) -> int:
        """Prepack every linear layer's weight for the CPU (see :class:`Linear`); returns how many were.

        ``drop_dense``: then :meth:`Linear.drop_dense` each layer as soon as it is packed (all but an LM head tied
        to the embeddings, whose lookups read the dense table), so that its weights are held once, as packed, and
        twice only one layer at a time while packing."""
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        count = 0
        for m in self.modules():
            if isinstance(m, Linear) and m.prepack(batch_hint):
                count += 1
                if drop_dense and not (tied and m is self.lm_head):
                    m.drop_dense()
        return count

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the new tokens of the batch ``attn`` was planned for.

        Parameters
        ----------
        input_ids, positions : ``[num_new_tokens]`` int64, the new tokens and their positions.
        attn : an attention backend on the model's cache, ``plan(batch)`` already called for this step.
        logit_rows : int64 rows whose logits are wanted (default: all).

        Returns ``[len(logit_rows), vocab_size]`` float32.
        """
        x = self.model.embed_tokens(input_ids)  # [N, hidden]
        cos, sin = rope_cos_sin(self.inv_freq, positions)  # [N, d / 2] float32 each
        residual: torch.Tensor | None = None
        stacked = self.native_layers.run(self, x, cos, sin, attn)  # the same kernels, bit-equal, less overhead
        if stacked is not None:
            x, residual = stacked
        else:
            for layer in self.model.layers:
                x, residual = layer(x, residual, cos, sin, attn)
        if logit_rows is not None:
            x = x.index_select(0, logit_rows)
            residual = residual.index_select(0, logit_rows) if residual is not None else None
        x = self.model.norm(x, residual)[0] if residual is not None else self.model.norm(x)
        return self.lm_head(x).float()

    # ------------------------------------------------------------------ Hugging Face weights
    @classmethod
    def from_hf_state_dict(cls, weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Hugging Face tensor names -> this model's (fused modules concatenated), in place: ``weights`` is
        changed and returned (a part is dropped from it once fused, so that it is freed then, not at the end).
        Unknown names pass through, so that a mismatch is reported by ``load_state_dict``."""
        for layer in range(config.num_layers):
            prefix = f"model.layers.{layer}."
            for fused, parts in cls.packed_modules.items():
                for kind in ("weight", "bias"):
                    names = [f"{prefix}{p}.{kind}" for p in parts]
                    present = [n in weights for n in names]
                    if all(present):
                        weights[f"{prefix}{fused}.{kind}"] = torch.cat([weights.pop(n) for n in names], dim=0)
        return weights

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face's names (fused modules split back; quantized ones dequantized), for
        transformers' model."""
        out = dict(self.state_dict())
        for name, module in self.named_modules():
            if isinstance(module, (Linear, Embedding)):  # (quantized or held only packed: the weight rebuilt)
                out[f"{name}.weight"] = module.dense_weight()
        cfg = self.config
        sizes = {"self_attn.qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
                 "mlp.gate_up_proj": [cfg.intermediate_size] * 2}
        for layer in range(cfg.num_layers):
            prefix = f"model.layers.{layer}."
            for fused, parts in self.packed_modules.items():
                for kind in ("weight", "bias"):
                    name = f"{prefix}{fused}.{kind}"
                    if name in out:
                        for part, t in zip(parts, torch.split(out.pop(name), sizes[fused], dim=0)):
                            out[f"{prefix}{part}.{kind}"] = t
        return out
