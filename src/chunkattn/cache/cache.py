"""``PrefixKVCache``: the public cache. A :class:`ChunkTree` (which tokens each chunk holds, shared by prefix)
plus a :class:`KVPool` (their keys and values), and the sequences that hold paths of the tree."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from chunkattn.cache.block_hash import chain, namespace_seed
from chunkattn.cache.eviction import EvictionPolicy, make_policy
from chunkattn.cache.pool import KVPool
from chunkattn.cache.tree import ChunkTree, Node
from chunkattn.errors import SequenceError
from chunkattn.utils import cdiv

if TYPE_CHECKING:
    from chunkattn.cache.plan import AttentionPlan

_cache_ids = itertools.count()


class Sequence:
    """A handle on one sequence of a :class:`PrefixKVCache` (created by ``add_sequence`` or ``fork``).

    Attributes
    ----------
    seq_id : int
        Unique within its cache.
    token_ids : list[int]
        Every token whose K/V the cache holds for this sequence, in order (read-only view).
    num_cached_tokens : int
        Tokens found in the cache when the sequence was added (0 for a fork: it shares everything).
    """

    __slots__ = ("seq_id", "_cache_id", "_end", "_tokens", "num_cached_tokens", "released")

    def __init__(self, seq_id: int, cache_id: int, end: Node, tokens: list[int], num_cached_tokens: int):
        self.seq_id = seq_id
        self._cache_id = cache_id
        self._end = end  # the chunk holding the sequence's last token (the tree root when it has none)
        self._tokens = tokens
        self.num_cached_tokens = num_cached_tokens
        self.released = False

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        state = "released" if self.released else f"{self.num_tokens} tokens"
        return f"Sequence(seq_id={self.seq_id}, {state})"


class PinnedPrefix:
    """A prefix held resident by :meth:`PrefixKVCache.pin` until :meth:`PrefixKVCache.unpin`.

    ``token_ids`` are the pinned tokens: the longest prefix of the requested tokens that the cache held.
    """

    __slots__ = ("token_ids", "_node", "_cache_id", "active")

    def __init__(self, token_ids: tuple[int, ...], node: Node, cache_id: int):
        self.token_ids = token_ids
        self._node = node
        self._cache_id = cache_id
        self.active = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"PinnedPrefix({self.num_tokens} tokens{'' if self.active else ', unpinned'})"


class PrefixMatch:
    """What a :class:`PrefixKVCache` holds of one token list, from one walk of its tree (:meth:`lookup`).

    ``num_cached_tokens``: leading tokens the cache holds (live or retained); ``chunks_needed``: worst-case
    chunks that adding a sequence of these tokens and computing it takes. Hand it to :meth:`add_sequence`
    (``match=``) to start the sequence without walking the tree again; once the tree changed (a chunk added,
    split or evicted) ``add_sequence`` walks it again, so a stale match is never wrong, only slower. (A leaf
    that grew in place since keeps the match valid, only shorter than a new walk would find.)
    """

    __slots__ = ("token_ids", "namespace", "num_cached_tokens", "chunks_needed", "_root", "_node", "_offset",
                 "_version", "_cache_id")

    def __init__(self, token_ids: tuple[int, ...], namespace: str | None, num_cached_tokens: int,
                 chunks_needed: int, root: Node | None, node: Node | None, offset: int, version: int, cache_id: int):
        self.token_ids = token_ids  # (a tuple: what the match was made of cannot change under it)
        self.namespace = namespace
        self.num_cached_tokens = num_cached_tokens
        self.chunks_needed = chunks_needed
        self._root, self._node, self._offset = root, node, offset  # where the match ends (None: no tree yet)
        self._version, self._cache_id = version, cache_id

    def __repr__(self) -> str:
        return f"PrefixMatch({self.num_cached_tokens} of {len(self.token_ids)} tokens cached)"

    @property
    def num_new_tokens(self) -> int:
        """Tokens a sequence started from this match computes: those past the cached prefix, and at least the
        last one (:meth:`PrefixKVCache.add_sequence` never hands it out: its logits are wanted)."""
        return _tokens_to_compute(len(self.token_ids), self.num_cached_tokens)


def _tokens_to_compute(num_tokens: int, num_cached: int) -> int:
    return num_tokens - min(num_cached, num_tokens - 1)


@dataclass(eq=False)
class Batch:
    """The new tokens of one ``extend`` call: what ``store`` writes and ``attention`` computes.

    Rows of ``k``/``v``/``q`` are the new tokens in call order, sequence by sequence.

    Attributes
    ----------
    seqs : tuple[Sequence, ...]
    num_new : tuple[int, ...]
        New tokens per sequence.
    q_indptr : list[int]
        ``[num_seqs + 1]``: rows ``q_indptr[i]:q_indptr[i+1]`` belong to ``seqs[i]``.
    seq_lens : tuple[int, ...]
        Tokens of each sequence including its new ones.
    store_rows, store_kv : torch.Tensor
        ``[num_stored]`` int64 on the cache's device: row ``store_rows[j]`` of ``k``/``v`` is written to K/V
        row ``store_kv[j]``. New tokens whose K/V the tree already held (an identical continuation of another
        sequence) are not stored again: their rows are missing here.
    """

    seqs: tuple[Sequence, ...]
    num_new: tuple[int, ...]
    q_indptr: list[int]
    seq_lens: tuple[int, ...]
    store_rows: torch.Tensor
    store_kv: torch.Tensor
    all_rows_stored: bool
    cache_id: int
    plan_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_new_tokens(self) -> int:
        return self.q_indptr[-1]

    @property
    def is_decode(self) -> bool:
        """One new token per sequence."""
        return all(n == 1 for n in self.num_new)


def _root_of(node: Node) -> Node:
    while node.parent is not None:
        node = node.parent
    return node


def _as_token_list(token_ids: Any, what: str) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise TypeError(f"{what} must be a 1-D integer tensor or a list of ints, got {token_ids.dtype} "
                            f"tensor of shape {tuple(token_ids.shape)}")
        tokens = [int(t) for t in token_ids.tolist()]
    elif isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise TypeError(f"{what} must be a list of int token ids, got {type(token_ids).__name__}")
    elif isinstance(token_ids, (list, tuple)) and all(type(t) is int for t in token_ids):
        tokens = list(token_ids)  # the common case, checked at C speed
    else:
        tokens = []
        for t in token_ids:
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise TypeError(f"{what} must hold int token ids, got {t!r} ({type(t).__name__})")
            tokens.append(t.__index__())
    if not tokens:
        raise ValueError(f"{what} is empty: give at least one token id")
    if min(tokens) < 0:
        raise ValueError(f"{what} holds a negative token id")
    return tokens


class PrefixKVCache:
    """A prefix-aware K/V cache: chunks of ``chunk_size`` tokens in a prefix tree, shared to the token.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Shape of the model's K/V. Storage per layer is ``[num_slots * chunk_size, num_kv_heads, head_dim]``.
    chunk_size : int
        Tokens per chunk (the paper uses 64).
    max_tokens : int
        Pool capacity in tokens (rounded up to whole chunks).
    dtype, device
        K/V storage dtype (float32, float16 or bfloat16) and device.
    retain_prefixes : bool
        Keep chunks after their last sequence is released, to be reused by later sequences with the same
        prefix; evicted least recently used, leaves first, only when room is needed. False frees at once.
    share_prefixes : bool
        False gives every added sequence chunks of its own (a baseline without prefix sharing: nothing is
        reused between sequences, nothing is retained); forks still share with their parent.
    eviction : str or EvictionPolicy
        Which retained chunks go first when room is needed: ``"lru"`` (default), ``"longest-first"``, or
        an :class:`~chunkattn.cache.eviction.EvictionPolicy` instance.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int = 64,
        max_tokens: int = 65536,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
        retain_prefixes: bool = True,
        share_prefixes: bool = True,
        eviction: str | EvictionPolicy | None = None,
    ):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("chunk_size", chunk_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.share_prefixes = share_prefixes
        self.retain_prefixes = retain_prefixes and share_prefixes
        self.num_slots = math.ceil(max_tokens / chunk_size)
        self.pool = KVPool(num_layers, self.num_slots, chunk_size, num_kv_heads, head_dim, dtype, torch.device(device))
        self.device = self.pool.device
        self._tree = ChunkTree(self.num_slots, chunk_size, make_policy(eviction))
        self._id = next(_cache_ids)
        self._next_seq_id = 0
        self._live: dict[int, Sequence] = {}
        self._pins: list[PinnedPrefix] = []
        self._last_plan: AttentionPlan | None = None
        self._epoch = 0  # bumped whenever a live sequence grows or is released (check_batch's memo)

    # ------------------------------------------------------------------ sequences
    @property
    def tree(self) -> ChunkTree:
        """The prefix tree (read it; change it only through this class)."""
        return self._tree

    @property
    def k_cache(self) -> torch.Tensor:
        """``[num_layers, num_slots * chunk_size, num_kv_heads, head_dim]``: every chunk's keys (the pool's)."""
        return self.pool.k

    @property
    def v_cache(self) -> torch.Tensor:
        """Like :attr:`k_cache`, the values."""
        return self.pool.v

    @property
    def chunk_bytes(self) -> int:
        """K+V bytes of one chunk across all layers."""
        return self.pool.chunk_bytes

    @property
    def sequences(self) -> list[Sequence]:
        """Live sequences, oldest first."""
        return list(self._live.values())

    def _check_seq(self, seq: Any) -> Sequence:
        if not isinstance(seq, Sequence):
            raise TypeError(f"expected a chunkattn Sequence, got {type(seq).__name__}")
        if seq._cache_id != self._id:
            raise SequenceError(f"{seq} belongs to another PrefixKVCache")
        if seq.released or self._live.get(seq.seq_id) is not seq:
            raise SequenceError(f"{seq} was released; add or fork a new sequence instead")
        return seq

    def _new_seq(self, end: Node, tokens: list[int], num_cached: int) -> Sequence:
        seq = Sequence(self._next_seq_id, self._id, end, tokens, num_cached)
        self._next_seq_id += 1
        self._live[seq.seq_id] = seq
        self._tree.enter_root(_root_of(end))
        self._tree.lock(end)
        self._tree.touch(end)
        return seq

    def _root(self, namespace: str | None, create: bool = True) -> Node | None:
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str or None, got {type(namespace).__name__}")
        return self._tree.namespace_root(namespace, create)

    def lookup(self, token_ids: Any, namespace: str | None = None, *, checked: bool = False) -> PrefixMatch:
        """How much of ``token_ids`` the cache holds in ``namespace``, and what adding it would take, from one
        walk of the tree. Changes nothing; pass the result to :meth:`add_sequence` to start the sequence.
        ``checked=True``: ``token_ids`` is a non-empty list or tuple of ints >= 0 that the caller has already
        validated (the engine's prompts: the scheduler looks them up every step), so it is not checked again."""
        tokens = list(token_ids) if checked else _as_token_list(token_ids, "token_ids")
        version, c = self._tree.version, self.chunk_size
        root = self._root(namespace, create=False) if self.share_prefixes else None
        if root is None:
            needed = cdiv(len(tokens), c) + (1 if self.share_prefixes else 0)
            return PrefixMatch(tuple(tokens), namespace, 0, needed, None, None, 0, version, self._id)
        node, offset, matched = self._tree.match(root, tokens)
        # the last token is always computed again; +1 for a tail that starts inside a chunk
        needed = cdiv(_tokens_to_compute(len(tokens), matched), c) + 1
        return PrefixMatch(tuple(tokens), namespace, matched, needed, root, node, offset, version, self._id)

    def is_current(self, match: PrefixMatch) -> bool:
        """Whether ``match`` (a :meth:`lookup` of this cache) still describes it exactly: no chunk was added, split
        or evicted since."""
        return match._cache_id == self._id and match._version == self._tree.version

    def match_prefix(self, token_ids: Any, namespace: str | None = None) -> int:
        """How many leading tokens of ``token_ids`` the cache holds (live or retained) in ``namespace``.
        Changes nothing."""
        return self.lookup(token_ids, namespace).num_cached_tokens

    def add_sequence(self, token_ids: Any, reuse_prefix: bool = True, namespace: str | None = None,
                     match: PrefixMatch | None = None) -> Sequence:
        """Start a sequence holding the longest cached prefix of ``token_ids``, at most ``len - 1`` tokens.

        The last prompt token is never taken from the cache so that the caller computes its logits. Extend
        the returned sequence with ``token_ids[seq.num_cached_tokens:]``. ``reuse_prefix=False`` starts it
        empty, so that every token is computed again (when the logits of every prompt token are wanted);
        its K/V still lands in (and shares) the cached chunks. ``namespace`` (e.g. a tenant's cache salt):
        sequences share chunks only with sequences of the same namespace (None is the common one).
        ``match``: this cache's :meth:`lookup` of the same tokens and namespace, to skip walking the tree again.
        """
        same = isinstance(match, PrefixMatch) and token_ids is match.token_ids
        # the match's own ids: checked by its lookup (or vouched for by its caller: lookup(checked=True))
        tokens = list(token_ids) if same else _as_token_list(token_ids, "token_ids")
        if match is not None and (not isinstance(match, PrefixMatch) or match._cache_id != self._id
                                  or match.namespace != namespace or (not same and match.token_ids != tuple(tokens))):
            raise ValueError("match must be this cache's lookup() of the same token ids and namespace")
        tree = self._tree
        if not self.share_prefixes:
            return self._new_seq(tree.new_root(), [], 0)
        root = self._root(namespace)
        assert root is not None
        if not reuse_prefix:
            return self._new_seq(root, [], 0)
        if match is not None and match._root is root and match._version == tree.version:
            node, offset, matched = self._without_last(match)
        else:
            node, offset, matched = tree.match(root, tokens[:-1])
        if 0 < offset < len(node):
            node = tree.split(node, offset)
        return self._new_seq(node, tokens[:matched], matched)

    @staticmethod
    def _without_last(match: PrefixMatch) -> tuple[Node, int, int]:
        """``tree.match(root, tokens[:-1])`` from a current match of ``tokens``: the same unless every token
        matched, then one token back."""
        node, offset, matched = match._node, match._offset, match.num_cached_tokens
        assert node is not None
        if matched < len(match.token_ids):
            return node, offset, matched
        if offset > 1:
            return node, offset - 1, matched - 1
        parent = node.parent
        assert parent is not None
        return parent, len(parent), matched - 1

    def fork(self, seq: Sequence) -> Sequence:
        """A new sequence sharing every token of ``seq``. Both may then diverge; nothing is copied."""
        seq = self._check_seq(seq)
        return self._new_seq(seq._end, list(seq._tokens), 0)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence. Its chunks stay cached (if ``retain_prefixes``) until evicted."""
        seq = self._check_seq(seq)
        tree = self._tree
        root = _root_of(seq._end)  # before eviction detaches the path
        tree.touch(seq._end)
        tree.unlock(seq._end)
        if not self.retain_prefixes:
            tree.evict_unreferenced(seq._end)
        tree.leave_root(root)
        seq.released = True
        del self._live[seq.seq_id]
        self._epoch += 1

    def evict_all(self) -> int:
        """Drop every retained (unreferenced) chunk now; return how many chunks were freed. Chunks of live
        sequences and pinned prefixes stay."""
        return self._tree.evict_all()

    # ------------------------------------------------------------------ pins
    def pin(self, token_ids: Any, namespace: str | None = None) -> PinnedPrefix:
        """Keep the longest cached prefix of ``token_ids`` resident (never evicted) until :meth:`unpin`.

        Pin a system prompt after computing it once so that no burst of other requests pushes it out. The
        returned handle says how many tokens were pinned (0 when none were cached). Pins nest: a prefix
        pinned twice needs two unpins.
        """
        if not self.share_prefixes:
            raise ValueError("pinning needs share_prefixes=True: without sharing no prefix is reused")
        tokens = _as_token_list(token_ids, "token_ids")
        tree = self._tree
        root = self._root(namespace)
        assert root is not None
        node, offset, matched = tree.match(root, tokens)
        if 0 < offset < len(node):
            node = tree.split(node, offset)
        tree.enter_root(root)
        tree.lock(node)
        tree.touch(node)
        pin = PinnedPrefix(tuple(tokens[:matched]), node, self._id)
        self._pins.append(pin)
        return pin

    def unpin(self, pin: PinnedPrefix) -> None:
        """Release a pin; its chunks become ordinary retained prefixes (evictable when unused)."""
        if not isinstance(pin, PinnedPrefix) or pin._cache_id != self._id:
            raise TypeError("unpin takes a PinnedPrefix returned by this cache's pin()")
        if not pin.active:
            raise ValueError(f"{pin} was already unpinned")
        self._tree.unlock(pin._node)
        self._tree.leave_root(_root_of(pin._node))
        pin.active = False
        self._pins.remove(pin)

    @property
    def pins(self) -> list[PinnedPrefix]:
        return list(self._pins)

    # ------------------------------------------------------------------ capacity (for schedulers)
    @property
    def num_free_chunks(self) -> int:
        """Chunks holding nothing."""
        return self._tree.num_free_slots

    @property
    def num_evictable_chunks(self) -> int:
        """Chunks that evicting retained (unreferenced, unpinned) prefixes would free."""
        return self._tree.num_evictable_slots

    @property
    def num_live_chunks(self) -> int:
        """Chunks holding a token of a live sequence or a pinned prefix."""
        return self._tree.num_live_slots

    def chunks_to_add(self, token_ids: Any, namespace: str | None = None) -> int:
        """Worst-case chunks that adding a sequence of ``token_ids`` (in ``namespace``) and computing it
        needs: its tokens the cache does not hold, plus one for a tail that starts inside a chunk."""
        return self.lookup(token_ids, namespace).chunks_needed

    def room_needed(self, matches: Iterable[PrefixMatch]) -> int:
        """Chunks of room (free or evictable) that starting a sequence from each of these current :meth:`lookup`
        matches and computing it takes: the worst-case new chunks (``chunks_needed``), plus the retained chunks of
        their cached prefixes that no live sequence holds, which stop being evictable once a sequence holds them.
        Compare with :meth:`can_allocate`."""
        revived: set[int] = set()
        needed = 0
        for m in matches:
            if not self.is_current(m):
                raise ValueError("room_needed takes current matches: the cache changed since this lookup")
            needed += m.chunks_needed
            if m._node is not None:
                revived.update(self._tree.slots_lock_makes_live(m._node))
        return needed + len(revived)

    def can_allocate(self, num_chunks: int) -> bool:
        """Whether ``num_chunks`` chunks can be had now, evicting retained prefixes if needed."""
        return num_chunks <= self.num_free_chunks + self.num_evictable_chunks

    # ------------------------------------------------------------------ extend / store
    def extend(self, seqs: SequenceABC[Sequence], new_token_ids: SequenceABC[Any]) -> Batch:
        """Make room for new tokens of several sequences (prefill: many each, decode: one each).

        Atomic: raises :class:`~chunkattn.CacheFullError` and changes nothing if the pool cannot hold the
        tokens even after evicting every retained prefix. New tokens that continue a path the tree already
        holds reuse its K/V (they are not stored again, see :attr:`Batch.store_rows`).
        """
        if isinstance(seqs, Sequence) or not isinstance(seqs, SequenceABC):
            raise TypeError("seqs must be a list of Sequence handles")
        if isinstance(new_token_ids, (str, bytes)) or not isinstance(new_token_ids, SequenceABC):
            raise TypeError("new_token_ids must be a list with one list of token ids per sequence")
        if len(seqs) != len(new_token_ids):
            raise ValueError(f"got {len(seqs)} sequences but {len(new_token_ids)} token lists")
        if not seqs:
            raise ValueError("extend needs at least one sequence")
        checked = [self._check_seq(s) for s in seqs]
        if len({s.seq_id for s in checked}) != len(checked):
            raise ValueError("a sequence appears twice in one extend call; concatenate its tokens instead")
        token_lists = [_as_token_list(t, f"new_token_ids[{i}]") for i, t in enumerate(new_token_ids)]
        tree = self._tree

        # Phase 1, nothing changes for good: pin the chunks each sequence will walk into, then count slots.
        pins: list[Node] = []
        needed = 0
        claimed: set[int] = set()
        for seq, tokens in zip(checked, token_lists):
            node, offset, matched = tree.match(seq._end, tokens)
            # the chunk the rest will be appended after; None when it is split first (no room after it then)
            after: Node | None = seq._end
            if matched:
                tree.lock(node)
                pins.append(node)
                after = node if offset == len(node) else None
            rest = len(tokens) - matched
            if rest:
                needed += tree.slots_needed(after, rest, claimed) if after is not None else cdiv(rest, self.chunk_size)
        try:
            tree.ensure_free(needed)  # raises CacheFullError before anything was changed for good
        except BaseException:
            for pin in pins:
                tree.unlock(pin)
            raise

        # Phase 2: walk, split and append. Cannot fail: the slots exist.
        self._epoch += 1
        store_kv: list[int] = []
        store_rows: list[int] = []
        q_indptr = [0]
        for seq, tokens in zip(checked, token_lists):
            row0 = q_indptr[-1]
            start = seq._end
            node, offset, matched = tree.match(start, tokens)
            if 0 < offset < len(node):
                node = tree.split(node, offset)
            if matched < len(tokens):
                grow = node.ref_count == (1 if node is start else 0) and not node.children
                rows: list[int] = []
                node = tree.append(node, tokens[matched:], rows, grow)
                store_kv.extend(rows)
                store_rows.extend(range(row0 + matched, row0 + len(tokens)))
            # every chunk below the old end down to the new one (a descendant, or the old end grown in place)
            # gains this sequence's reference; the path above holds it already. (Recency is marked when a
            # sequence is added or released: a chunk a live sequence holds cannot be evicted meanwhile.)
            tree.lock(node, stop=start)
            seq._end = node
            seq._tokens.extend(tokens)
            q_indptr.append(row0 + len(tokens))
        for pin in pins:
            tree.unlock(pin)

        dev = self.device
        return Batch(
            seqs=tuple(checked),
            num_new=tuple(len(t) for t in token_lists),
            q_indptr=q_indptr,
            seq_lens=tuple(s.num_tokens for s in checked),
            store_rows=torch.tensor(store_rows, dtype=torch.int64, device=dev),
            store_kv=torch.tensor(store_kv, dtype=torch.int64, device=dev),
            all_rows_stored=len(store_rows) == q_indptr[-1],
            cache_id=self._id,
        )

    def check_batch(self, batch: Batch) -> None:
        """Raise if ``batch`` does not belong to this cache or one of its sequences changed since."""
        if not isinstance(batch, Batch):
            raise TypeError(f"expected a Batch from PrefixKVCache.extend, got {type(batch).__name__}")
        if batch.cache_id != self._id:
            raise ValueError("this batch was made by another PrefixKVCache")
        if batch.plan_cache.get("checked_at") == self._epoch:
            return  # checked, and no sequence grew or was released since (~6 us a call at 32 sequences)
        for seq, n in zip(batch.seqs, batch.seq_lens):
            self._check_seq(seq)
            if seq.num_tokens != n:
                raise ValueError(f"{seq} was extended after this batch was made; use the newest batch")
        batch.plan_cache["checked_at"] = self._epoch

    def store(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' K/V of one layer.

        Parameters
        ----------
        k, v : torch.Tensor
            ``[batch.num_new_tokens, num_kv_heads, head_dim]``, the cache's dtype and device.
        """
        layer = self.pool.check_layer(layer)
        self.check_batch(batch)
        self.pool.check_kv(k, v, batch.num_new_tokens)
        self.write_kv(layer, batch, k, v)

    def write_kv(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`store` without validation, for attention backends that checked ``batch`` once per step."""
        self.pool.write(layer, k, v, batch.store_rows, batch.store_kv, batch.all_rows_stored)

    # ------------------------------------------------------------------ plans and views
    def plan(self, batch: Batch) -> AttentionPlan:
        """The attention plan of ``batch`` (shared chunks and each sequence's own chunks), built once.

        Reused by every layer; for consecutive decode steps of the same sequences it is rebuilt only when
        the tree's structure changed (a chunk was added, split or evicted), else only its lengths advance.
        """
        from chunkattn.cache.plan import AttentionPlan

        cached = batch.plan_cache.get("plan")
        if cached is not None:
            return cached
        self.check_batch(batch)
        last = self._last_plan
        if last is not None and last.can_advance_to(batch, self._tree.version):
            last.advance(batch)
            plan = last
        else:
            plan = AttentionPlan.build(batch, self._tree.version, self.chunk_size, self.device)
        self._last_plan = plan
        batch.plan_cache["plan"] = plan
        return plan

    def sequence_kv_rows(self, seq: Sequence) -> torch.Tensor:
        """``[seq.num_tokens]`` int64: the K/V row of each of the sequence's tokens, in order."""
        seq = self._check_seq(seq)
        c = self.chunk_size
        rows = [torch.arange(n.kv_begin(c), n.kv_begin(c) + len(n)) for n in seq._end.path()]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ accounting
    def stats(self) -> dict[str, int]:
        """Pool accounting.

        ``total_chunks``, ``free_chunks``; ``used_chunks``: holding a token of a live sequence or a pin;
        ``cached_chunks``: held only for retained prefixes (evictable); ``shared_chunks``: tree chunks on the
        path of two or more live sequences; ``live_tokens``: distinct tokens referenced by live sequences;
        ``cached_tokens``: tokens held only for retention; ``kv_bytes``: K/V bytes of used + cached chunks
        (all layers); ``num_sequences``; ``shared_tokens``: tokens referenced by two or more live sequences
        (or pins); ``saved_tokens``: tokens that private copies would add (each extra reference to a token).
        """
        tree = self._tree
        live_tokens = cached_tokens = shared = shared_tokens = saved_tokens = 0
        for node in tree.nodes():
            if node.ref_count:
                live_tokens += len(node)
                if node.ref_count >= 2:
                    shared += 1
                    shared_tokens += len(node)
                    saved_tokens += (node.ref_count - 1) * len(node)
            else:
                cached_tokens += len(node)
        used = tree.num_live_slots
        held = tree.num_held_slots
        return {
            "total_chunks": self.num_slots,
            "free_chunks": tree.num_free_slots,
            "used_chunks": used,
            "cached_chunks": held - used,
            "shared_chunks": shared,
            "live_tokens": live_tokens,
            "cached_tokens": cached_tokens,
            "kv_bytes": held * self.chunk_bytes,
            "num_sequences": len(self._live),
            "shared_tokens": shared_tokens,
            "saved_tokens": saved_tokens,
        }

    def block_hashes(self, block_size: int, limit: int | None = None) -> list[int]:
        """Names (:func:`chunkattn.cache.block_hash.block_hashes`) of every full ``block_size``-token block on
        the paths of the main tree and of each namespace's (seeded with its name), shortest prefixes first; at
        most ``limit``. What a replica reports to a prefix-aware router: a name reveals nothing of the tokens
        but lets a request with the same prefix (and salt) be sent here."""
        out: list[int] = []
        # (node, hash of the last full block, tokens since it) per pending path, breadth first
        roots = [(None, self._tree.root), *self._tree.namespaces()]
        frontier: list[tuple[Node, int, tuple[int, ...]]] = [
            (c, namespace_seed(name), ()) for name, root in roots for c in root.children.values()]
        while frontier and (limit is None or len(out) < limit):
            nxt: list[tuple[Node, int, tuple[int, ...]]] = []
            for node, h, pending in frontier:
                tokens = pending + tuple(node.tokens)
                while len(tokens) >= block_size:
                    h = chain(h, tokens[:block_size])
                    out.append(h)
                    tokens = tokens[block_size:]
                nxt.extend((c, h, tokens) for c in node.children.values())
            frontier = nxt
        return out if limit is None else out[:limit]

    def check(self) -> None:
        """Validate every invariant of the tree, the pool and the live sequences; raise on violation."""
        from chunkattn.errors import CacheCorruptedError

        refs: dict[int, int] = {}
        for seq in self._live.values():
            path = seq._end.path()
            tokens = [t for n in path for t in n.tokens]
            if tokens != seq._tokens:
                raise CacheCorruptedError(f"{seq}: tree path tokens differ from the sequence's tokens")
            if seq._end.parent is None and seq._end.tokens:
                raise CacheCorruptedError(f"{seq} ends at an evicted chunk")
            for n in path:
                refs[n.id] = refs.get(n.id, 0) + 1
        for pin in self._pins:
            path = pin._node.path()
            if tuple(t for n in path for t in n.tokens) != pin.token_ids:
                raise CacheCorruptedError(f"{pin}: tree path tokens differ from the pinned tokens")
            for n in path:
                refs[n.id] = refs.get(n.id, 0) + 1
        self._tree.check(refs)
        if not self.retain_prefixes and any(n.ref_count == 0 for n in self._tree.nodes()):
            raise CacheCorruptedError("retain_prefixes=False but an unreferenced chunk is still held")
