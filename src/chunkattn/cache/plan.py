"""The attention plan of a batch: which chunks are shared by which sequences, and each sequence's own chunks.

This is the paper's "kernel context". It is built on the host from the tree once per batch, reused by every
layer, and for consecutive decode steps only its lengths advance until the tree's structure changes.

A chunk is *shared* (chunk-first phase) when at least two sequences of the batch hold it entirely before
their first new token; every other chunk of a sequence's path is *private* to it (sequence-first phase,
causally masked where it holds new tokens). Positions count tokens from the start of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from chunkattn.cache.cache import Batch
    from chunkattn.cache.tree import Node

@dataclass(eq=False)
class PlanTensors:
    """Device copies (int64) of a plan's index arrays; same names and meaning as :class:`AttentionPlan`'s."""

    q_indptr: torch.Tensor
    q_pos: torch.Tensor
    seq_lens: torch.Tensor
    shared_kv_begin: torch.Tensor
    shared_len: torch.Tensor
    shared_seq_indptr: torch.Tensor
    shared_seq_indices: torch.Tensor
    private_indptr: torch.Tensor
    private_kv_begin: torch.Tensor
    private_len: torch.Tensor
    private_pos: torch.Tensor


class PlanWorkspace(Protocol):
    """What a backend keeps per plan (launch metadata, buffers). ``advance`` follows a decode step in place."""

    def advance(self, plan: AttentionPlan) -> None: ...


@dataclass(eq=False)
class AttentionPlan:
    """The index arrays of a batch (host lists; :attr:`tensors` has their device copies) and backend
    workspaces. Row ``r`` is a query row (a new token); ``b`` a sequence in batch order; ``j`` a chunk.

    Attributes
    ----------
    q_indptr : ``[num_seqs + 1]`` query rows of sequence ``b`` are ``q_indptr[b]:q_indptr[b+1]``.
    q_pos : ``[num_rows]`` position of each query token in its sequence.
    seq_lens : ``[num_seqs]`` tokens of each sequence, new ones included.
    shared_kv_begin, shared_len : ``[num_shared]`` first K/V row and tokens of each shared chunk.
    shared_seq_indptr, shared_seq_indices : ``[num_shared + 1]`` and ``[...]``: the sequences sharing chunk
        ``j`` are ``shared_seq_indices[shared_seq_indptr[j]:shared_seq_indptr[j+1]]`` (batch order).
    private_indptr : ``[num_seqs + 1]`` private chunks of sequence ``b`` are ``private_indptr[b]:[b+1]``.
    private_kv_begin, private_len, private_pos : ``[num_private]`` first K/V row, tokens and position of the
        first token of each private chunk.
    """

    q_indptr: list[int]
    q_pos: list[int]
    seq_lens: list[int]
    shared_kv_begin: list[int]
    shared_len: list[int]
    shared_seq_indptr: list[int]
    shared_seq_indices: list[int]
    private_indptr: list[int]
    private_kv_begin: list[int]
    private_len: list[int]
    private_pos: list[int]
    version: int
    seq_ids: tuple[int, ...]
    end_nodes: tuple[Node, ...]
    is_decode: bool
    chunk_size: int
    device: torch.device
    num_builds: int = 1  # how many times this plan was built from the tree (1) ...
    num_advances: int = 0  # ... and advanced by lengths only
    workspaces: dict[str, PlanWorkspace] = field(default_factory=dict, repr=False)  # backend name -> its own
    _tensors: PlanTensors | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_rows(self) -> int:
        return self.q_indptr[-1]

    @property
    def num_shared(self) -> int:
        return len(self.shared_len)

    @property
    def num_private(self) -> int:
        return len(self.private_len)

    @property
    def num_shared_tokens(self) -> int:
        """Tokens in shared chunks (each counted once)."""
        return sum(self.shared_len)

    def shared_users(self, j: int) -> list[int]:
        """Batch indices of the sequences sharing shared chunk ``j``."""
        ind = self.shared_seq_indptr
        return self.shared_seq_indices[ind[j] : ind[j + 1]]

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

    @property
    def tensors(self) -> PlanTensors:
        """The device copies of the index arrays (made on first use, updated in place by :meth:`advance`)."""
        if self._tensors is None:
            self._tensors = PlanTensors(**{
                f.name: torch.tensor(getattr(self, f.name), dtype=torch.int64, device=self.device)
                for f in fields(PlanTensors)})
        return self._tensors

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
        q_pos: list[int] = []
        for b in range(len(seqs)):
            q_pos.extend(range(first_new[b], batch.seq_lens[b]))
        shared_seq_indices: list[int] = []
        shared_seq_indptr = [0]
        for node in shared:
            shared_seq_indices.extend(users[node.id])
            shared_seq_indptr.append(len(shared_seq_indices))
        private: list[Node] = []
        private_indptr = [0]
        for b, path in enumerate(paths):
            private.extend(n for n in path if not (n.id in shared_ids and n.end_pos <= first_new[b]))
            private_indptr.append(len(private))
        return cls(
            q_indptr=list(batch.q_indptr),
            q_pos=q_pos,
            seq_lens=list(batch.seq_lens),
            shared_kv_begin=[n.kv_begin(chunk_size) for n in shared],
            shared_len=[len(n) for n in shared],
            shared_seq_indptr=shared_seq_indptr,
            shared_seq_indices=shared_seq_indices,
            private_indptr=private_indptr,
            private_kv_begin=[n.kv_begin(chunk_size) for n in private],
            private_len=[len(n) for n in private],
            private_pos=[n.pos for n in private],
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
        self.seq_lens = list(batch.seq_lens)
        self.q_pos = [n - 1 for n in self.seq_lens]
        for b, end in enumerate(self.end_nodes):
            self.private_len[self.private_indptr[b + 1] - 1] = len(end)
        t = self._tensors
        if t is not None:
            with torch.inference_mode():  # the tensors may have been made in inference mode (a model's forward)
                for name in ("seq_lens", "q_pos", "private_len"):
                    getattr(t, name).copy_(torch.tensor(getattr(self, name), dtype=torch.int64), non_blocking=True)
        self.num_advances += 1
        # Workspaces that can follow the new lengths in place do; the others are rebuilt on next use.
        for name, ws in list(self.workspaces.items()):
            advance = getattr(ws, "advance", None)
            if advance is None:
                del self.workspaces[name]
            else:
                advance(self)
