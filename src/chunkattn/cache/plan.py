"""The attention plan of a batch: which chunks are shared by which sequences, and each sequence's own chunks.

This is the paper's "kernel context". It is built on the host from the tree once per batch, reused by every
layer, and for consecutive decode steps only its lengths advance until the tree's structure changes.

A chunk is *shared* (chunk-first phase) when at least two sequences of the batch hold it entirely before
their first new token; every other chunk of a sequence's path is *private* to it (sequence-first phase,
causally masked where it holds new tokens). Positions count tokens from the start of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from chunkattn.cache.cache import Batch
    from chunkattn.cache.tree import Node

# Index arrays of a plan, each a list of ints on the host and an int64 tensor on the device.
PLAN_ARRAYS = (
    "q_indptr",  # [num_seqs + 1]: query rows of sequence i are q_indptr[i]:q_indptr[i+1]
    "q_pos",  # [num_rows]: position of each query token in its sequence
    "seq_lens",  # [num_seqs]: tokens of each sequence, new ones included
    "shared_kv_begin",  # [num_shared]: first K/V row of each shared chunk
    "shared_len",  # [num_shared]: tokens in each shared chunk
    "shared_seq_indptr",  # [num_shared + 1]: sequences of shared chunk j are
    "shared_seq_indices",  # shared_seq_indices[shared_seq_indptr[j]:shared_seq_indptr[j+1]] (batch order)
    "private_indptr",  # [num_seqs + 1]: private chunks of sequence i are private_indptr[i]:private_indptr[i+1]
    "private_kv_begin",  # [num_private]: first K/V row of each private chunk
    "private_len",  # [num_private]: tokens in each private chunk
    "private_pos",  # [num_private]: position of each private chunk's first token
)


@dataclass(eq=False)
class AttentionPlan:
    """Host-side index arrays (see ``PLAN_ARRAYS``) plus their device copies and backend workspaces."""

    host: dict[str, list[int]]
    version: int
    seq_ids: tuple[int, ...]
    end_nodes: tuple[Node, ...]
    is_decode: bool
    chunk_size: int
    device: torch.device
    num_builds: int = 1  # how many times this plan was built from the tree (1) ...
    num_advances: int = 0  # ... and advanced by lengths only
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    workspaces: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.host["seq_lens"])

    @property
    def num_rows(self) -> int:
        return self.host["q_indptr"][-1]

    @property
    def num_shared(self) -> int:
        return len(self.host["shared_len"])

    @property
    def num_private(self) -> int:
        return len(self.host["private_len"])

    def shared_users(self, j: int) -> list[int]:
        """Batch indices of the sequences sharing shared chunk ``j``."""
        ind = self.host["shared_seq_indptr"]
        return self.host["shared_seq_indices"][ind[j] : ind[j + 1]]

    def shared_runs(self) -> list[tuple[int, int]]:
        """``[begin, end)`` ranges of consecutive shared chunks used by the same sequences (a prompt's chunks
        form one run): attention can sweep a run's keys in one pass for all of its queries."""
        runs: list[tuple[int, int]] = []
        for j in range(self.num_shared):
            if runs and self.shared_users(j) == self.shared_users(runs[-1][0]):
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
        return runs

    def tensor(self, name: str) -> torch.Tensor:
        """The device copy of index array ``name`` (int64), made on first use."""
        t = self._tensors.get(name)
        if t is None:
            t = torch.tensor(self.host[name], dtype=torch.int64, device=self.device)
            self._tensors[name] = t
        return t

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, batch: Batch, version: int, chunk_size: int, device: torch.device,
              share: bool = True) -> AttentionPlan:
        """The plan of ``batch``; ``share=False`` makes every chunk private (a paged-attention baseline)."""
        seqs = batch.seqs
        paths = [s._end.path() for s in seqs]
        first_new = [n - k for n, k in zip(batch.seq_lens, batch.num_new)]
        users: dict[int, list[int]] = {}  # chunk id -> batch indices holding it entirely before their new tokens
        order: list[Node] = []
        for b, path in enumerate(paths):
            for node in path:
                if node.end_pos > first_new[b]:
                    break
                lst = users.get(node.id)
                if lst is None:
                    users[node.id] = lst = []
                    order.append(node)
                lst.append(b)
        shared = [n for n in order if len(users[n.id]) >= 2] if share else []
        shared_ids = {n.id for n in shared}
        h: dict[str, list[int]] = {name: [] for name in PLAN_ARRAYS}
        h["q_indptr"] = list(batch.q_indptr)
        h["seq_lens"] = list(batch.seq_lens)
        for b in range(len(seqs)):
            h["q_pos"].extend(range(first_new[b], batch.seq_lens[b]))
        h["shared_seq_indptr"].append(0)
        for node in shared:
            h["shared_kv_begin"].append(node.kv_begin(chunk_size))
            h["shared_len"].append(len(node))
            h["shared_seq_indices"].extend(users[node.id])
            h["shared_seq_indptr"].append(len(h["shared_seq_indices"]))
        h["private_indptr"].append(0)
        for b, path in enumerate(paths):
            for node in path:
                if node.id in shared_ids and node.end_pos <= first_new[b]:
                    continue
                h["private_kv_begin"].append(node.kv_begin(chunk_size))
                h["private_len"].append(len(node))
                h["private_pos"].append(node.pos)
            h["private_indptr"].append(len(h["private_len"]))
        return cls(
            host=h,
            version=version,
            seq_ids=tuple(s.seq_id for s in seqs),
            end_nodes=tuple(s._end for s in seqs),
            is_decode=batch.is_decode,
            chunk_size=chunk_size,
            device=device,
        )

    # ------------------------------------------------------------------ advance
    def can_advance_to(self, batch: Batch, version: int) -> bool:
        """True when ``batch`` is the next decode step of the same sequences and no chunk was added,
        split or evicted since: then every path is unchanged except that its last chunk grew."""
        return (
            self.is_decode
            and batch.is_decode
            and version == self.version
            and self.seq_ids == tuple(s.seq_id for s in batch.seqs)
            and all(a is s._end for a, s in zip(self.end_nodes, batch.seqs))
        )

    def advance(self, batch: Batch) -> None:
        """Update lengths for the next decode step (see :meth:`can_advance_to`), in place on the device too."""
        h = self.host
        lens = list(batch.seq_lens)
        h["seq_lens"] = lens
        h["q_pos"] = [n - 1 for n in lens]
        priv_len = h["private_len"]
        for b, end in enumerate(self.end_nodes):
            priv_len[h["private_indptr"][b + 1] - 1] = len(end)
        for name in ("seq_lens", "q_pos", "private_len"):
            t = self._tensors.get(name)
            if t is not None:
                t.copy_(torch.tensor(h[name], dtype=torch.int64), non_blocking=True)
        self.num_advances += 1
        # Workspaces that can follow the new lengths in place do; the others are rebuilt on next use.
        for name, ws in list(self.workspaces.items()):
            advance = getattr(ws, "advance", None)
            if advance is None:
                del self.workspaces[name]
            else:
                advance(self)
