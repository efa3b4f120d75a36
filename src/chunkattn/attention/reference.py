"""The oracle: per-sequence gather + softmax in float64. Simple on purpose; slow."""

from __future__ import annotations

import torch

from chunkattn.attention.backend import AttentionBackend, register_backend
from chunkattn.cache.cache import Batch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_kv_rows: list[torch.Tensor],
    q_indptr: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's new tokens over all of its tokens.

    Parameters
    ----------
    q : ``[num_rows, num_q_heads, head_dim]``, the new tokens of every sequence, sequence by sequence.
    k, v : ``[num_kv_rows, num_kv_heads, head_dim]``, one layer's K/V storage.
    seq_kv_rows : one ``[seq_len]`` int64 tensor per sequence: the K/V row of each of its tokens, in order.
        Its last ``q_indptr[i+1] - q_indptr[i]`` tokens are the sequence's new tokens.
    q_indptr : ``[num_seqs + 1]`` row offsets of each sequence in ``q``.

    Returns
    -------
    out : ``[num_rows, num_q_heads, head_dim]`` in ``q.dtype``.
    lse : ``[num_rows, num_q_heads]`` float32, natural-log sum of exp of the scaled scores.
    """
    num_rows, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.empty(num_rows, num_q_heads, dtype=torch.float64, device=q.device)
    for i, rows in enumerate(seq_kv_rows):
        r0, r1 = q_indptr[i], q_indptr[i + 1]
        seq_len, n_new = rows.numel(), r1 - r0
        rows = rows.to(k.device)
        keys = k[rows].double().repeat_interleave(group, dim=1)  # [seq_len, num_q_heads, head_dim]
        vals = v[rows].double().repeat_interleave(group, dim=1)
        qs = q[r0:r1].double()  # [n_new, num_q_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale  # [num_q_heads, n_new, seq_len]
        q_pos = torch.arange(seq_len - n_new, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        lse[r0:r1] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        out[r0:r1] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vals)
    return out.to(q.dtype), lse.float()


@register_backend
class ReferenceBackend(AttentionBackend):
    """The float64 oracle as a backend (for tests; slow)."""

    name = "reference"

    def _prepare(self, batch: Batch) -> None:
        self._rows = [self.cache.sequence_kv_rows(s) for s in batch.seqs]

    def run(self, q: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        return reference_attention(q, cache.k_cache[layer], cache.v_cache[layer], self._rows, self.batch.q_indptr,
                                   self.scale)
