"""The prefix tree of chunks: token-exact sharing, reference counts, LRU eviction. No tensors here.

Vocabulary
----------
slot
    One physical chunk of the pool: ``chunk_size`` consecutive token rows of K/V storage. Token row
    ``slot * chunk_size + offset`` of every layer's K and V belongs to it.
chunk (a :class:`Node`)
    A run of tokens stored at consecutive rows of one slot: ``tokens``, ``slot``, ``start``. A chunk is a
    node of the prefix tree, keyed in its parent by its first token.

Sharing is exact to the token: when a sequence diverges inside a chunk, the chunk is *split* into a prefix
and a suffix chunk that stay in the same slot (no K/V is copied, no row is wasted). The chunks of one slot
therefore form a chain parent -> child covering rows ``[0, slot_fill)`` of the slot in order; a child can be
placed in its parent's slot when the parent is the slot's last chunk and the slot has room. Only the last
chunk of a slot can be a leaf, so evicting a leaf only ever shrinks its slot's fill, and frees the slot when
the leaf started at row 0.

Reference counts count the live sequences whose path passes through a chunk (and pins). A chunk with
count 0 is retained ("cached"), evictable once it is a leaf, in the order of an :class:`EvictionPolicy`
(least recently used first by default).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from chunkattn.cache.eviction import EvictionPolicy, LRUPolicy
from chunkattn.errors import CacheCorruptedError, CacheFullError
from chunkattn.utils import cdiv

_HeapEntry = tuple[tuple[int, ...], int, "Node"]


class Node:
    """One chunk of the tree (the root is a token-less sentinel with ``slot == -1``)."""

    __slots__ = ("id", "tokens", "slot", "start", "pos", "parent", "children", "ref_count", "last_access")

    def __init__(self, node_id: int, tokens: list[int], slot: int, start: int, pos: int, parent: Node | None):
        self.id = node_id
        self.tokens = tokens  # token ids stored in this chunk, in order
        self.slot = slot  # physical slot, -1 for the root
        self.start = start  # first row of the chunk inside its slot
        self.pos = pos  # position in the sequence of the chunk's first token (= tokens before it on the path)
        self.parent = parent
        self.children: dict[int, Node] = {}  # keyed by the child's first token
        self.ref_count = 0
        self.last_access = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def end_pos(self) -> int:
        """Position just past the chunk's last token."""
        return self.pos + len(self.tokens)

    def kv_begin(self, chunk_size: int) -> int:
        """Row of the chunk's first token in the flat ``[num_slots * chunk_size, ...]`` K/V storage."""
        return self.slot * chunk_size + self.start

    def path(self) -> list[Node]:
        """The chunks from the root's first child down to this one (empty for the root)."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes

    def __repr__(self) -> str:
        return f"Node(id={self.id}, slot={self.slot}, start={self.start}, len={len(self.tokens)}, ref={self.ref_count})"


class ChunkTree:
    """Prefix tree over ``num_slots`` slots of ``chunk_size`` token rows each.

    All mutation goes through :meth:`match`, :meth:`split`, :meth:`append`, :meth:`lock`, :meth:`unlock`,
    :meth:`evict_unreferenced` and :meth:`ensure_free`. ``version`` increases whenever the set of chunks or
    their boundaries change (not when a chunk grows in place), so callers can cache per-batch plans.
    """

    def __init__(self, num_slots: int, chunk_size: int, policy: EvictionPolicy | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if num_slots < 1:
            raise ValueError(f"the pool needs at least one slot, got num_slots={num_slots}")
        self.chunk_size = chunk_size
        self.num_slots = num_slots
        self.policy = policy or LRUPolicy()
        self.root = Node(0, [], -1, 0, 0, None)
        self.version = 0
        self._next_id = 1
        self._clock = 0
        self._free_slots = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._slot_fill = [0] * num_slots  # rows in use in each slot
        self._slot_head: list[Node | None] = [None] * num_slots  # the chunk at row 0 of each held slot
        self._num_live_slots = 0  # held slots whose head chunk is referenced (so nothing in them is evictable)
        self._candidates: list[_HeapEntry] = []  # heap of (priority, id, leaf) of unreferenced leaves
        self._private_roots: dict[int, Node] = {}  # every root but the main one (see new_root), by id
        self._namespaces: dict[str, Node] = {}  # named roots (see namespace_root)
        self._namespace_of: dict[int, str] = {}  # named root id -> its name
        self._root_users: dict[int, int] = {}  # root id -> live sequences and pins under it (not the main root)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_held_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def num_live_slots(self) -> int:
        """Held slots with at least one chunk referenced by a live sequence (or pin)."""
        return self._num_live_slots

    @property
    def num_evictable_slots(self) -> int:
        """Held slots that evicting retained chunks would free."""
        return self.num_held_slots - self._num_live_slots

    def slot_room(self, node: Node) -> int:
        """Rows free after ``node`` in its slot if ``node`` is the slot's last chunk, else 0."""
        if node.parent is None or node.start + len(node) != self._slot_fill[node.slot]:
            return 0
        return self.chunk_size - self._slot_fill[node.slot]

    def new_root(self) -> Node:
        """A private root: a sequence started there shares chunks with nobody (prefix sharing off)."""
        root = Node(self._next_id, [], -1, 0, 0, None)
        self._next_id += 1
        self._private_roots[root.id] = root
        return root

    def namespace_root(self, namespace: str | None, create: bool = True) -> Node | None:
        """The root of ``namespace``'s own tree (None: the main tree), created on first use unless
        ``create=False`` (then None if it has none). Sequences under different roots never share a chunk, so
        a tenant's cached prefixes are invisible to the others."""
        if namespace is None:
            return self.root
        root = self._namespaces.get(namespace)
        if root is None and create:
            root = self._namespaces[namespace] = self.new_root()
            self._namespace_of[root.id] = namespace
        return root

    def namespaces(self) -> list[tuple[str, Node]]:
        """``(name, root)`` of every namespace that has a tree now."""
        return list(self._namespaces.items())

    @property
    def num_roots(self) -> int:
        """Roots besides the main one (private and namespace roots)."""
        return len(self._private_roots)

    def enter_root(self, root: Node) -> None:
        """Count a live sequence or pin under ``root`` (a root stays while it has users or chunks)."""
        if root is not self.root:
            self._root_users[root.id] = self._root_users.get(root.id, 0) + 1

    def leave_root(self, root: Node) -> None:
        """Undo :meth:`enter_root`; the root is forgotten once it has neither users nor chunks."""
        if root is not self.root:
            self._root_users[root.id] -= 1
            if not self._root_users[root.id]:
                del self._root_users[root.id]
            self._drop_root_if_unused(root)

    def _drop_root_if_unused(self, root: Node) -> None:
        if root is self.root or root.children or self._root_users.get(root.id):
            return
        self._private_roots.pop(root.id, None)
        name = self._namespace_of.pop(root.id, None)
        if name is not None:
            del self._namespaces[name]

    def nodes(self) -> Iterator[Node]:
        """Every chunk of the tree (not the roots), parents before children."""
        stack = list(self.root.children.values())
        for root in self._private_roots.values():
            stack.extend(root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def match(self, node: Node, tokens: Sequence[int]) -> tuple[Node, int, int]:
        """Follow ``tokens`` down from the end of ``node`` as far as the tree holds them.

        Returns ``(last, offset, matched)``: ``matched`` tokens were found; the last of them is at index
        ``offset - 1`` of chunk ``last`` (``offset == len(last)`` when the match ends on a chunk boundary;
        ``last is node`` and ``offset == len(node)`` when nothing matched).
        """
        if not isinstance(tokens, list):
            tokens = list(tokens)
        last, offset, matched = node, len(node), 0
        while matched < len(tokens):
            child = last.children.get(tokens[matched])
            if child is None:
                break
            limit = min(len(child), len(tokens) - matched)
            ctoks = child.tokens
            if ctoks[:limit] == tokens[matched : matched + limit]:  # the common case, compared in C
                n = limit
            else:  # they diverge inside this chunk
                n = 1
                while n < limit and ctoks[n] == tokens[matched + n]:
                    n += 1
            last, offset, matched = child, n, matched + n
            if n < len(child):
                break
        return last, offset, matched

    # ------------------------------------------------------------------ structure changes
    def _new_node(self, tokens: list[int], slot: int, start: int, parent: Node) -> Node:
        node = Node(self._next_id, tokens, slot, start, parent.end_pos, parent)
        self._next_id += 1
        return node

    def split(self, node: Node, offset: int) -> Node:
        """Cut ``node`` after ``offset`` tokens; return the new prefix chunk (``node`` keeps the suffix).

        Keeping ``node`` as the suffix means sequences that end at it stay valid. Both halves keep their rows.
        """
        assert 0 < offset < len(node), (offset, len(node))
        parent = node.parent
        assert parent is not None
        prefix = self._new_node(node.tokens[:offset], node.slot, node.start, parent)
        prefix.ref_count = node.ref_count
        prefix.last_access = node.last_access
        parent.children[prefix.tokens[0]] = prefix
        node.tokens = node.tokens[offset:]
        node.start += offset
        node.pos += offset
        node.parent = prefix
        prefix.children[node.tokens[0]] = node
        if prefix.start == 0:
            self._slot_head[prefix.slot] = prefix
        self.version += 1
        return prefix

    def append(self, node: Node, tokens: Sequence[int], rows: list[int], grow: bool) -> Node:
        """Store ``tokens`` after chunk ``node``; return the chunk holding the last of them.

        ``grow`` lets the tokens go into ``node`` itself when it is a leaf that is its slot's last chunk
        (the caller decides whether growing is safe, i.e. no other sequence ends at ``node``). Otherwise new
        chunks are created, the first in ``node``'s slot if it has room. Slots come from the free list or by
        evicting retained chunks; the caller must have checked with :meth:`slots_needed` that they exist.
        The K/V row of every token is appended to ``rows``.
        """
        c = self.chunk_size
        i = 0
        if grow and node.parent is not None and not node.children:
            room = self.slot_room(node)
            take = min(room, len(tokens))
            if take:
                base = node.kv_begin(c) + len(node)
                node.tokens.extend(tokens[:take])
                self._slot_fill[node.slot] += take
                rows.extend(range(base, base + take))
                i = take
        while i < len(tokens):
            room = self.slot_room(node)
            if room:
                slot, start = node.slot, self._slot_fill[node.slot]
            else:
                slot, start, room = self._take_slot(), 0, c
            take = min(room, len(tokens) - i)
            child = self._new_node(list(tokens[i : i + take]), slot, start, node)
            assert child.tokens[0] not in node.children, "append must start where match() stopped"
            node.children[child.tokens[0]] = child
            self._slot_fill[slot] = start + take
            if start == 0:
                self._slot_head[slot] = child
            base = slot * c + start
            rows.extend(range(base, base + take))
            self.version += 1
            node = child
            i += take
        return node

    def slots_needed(self, node: Node, num_tokens: int, claimed_slots: set[int]) -> int:
        """Worst-case fresh slots :meth:`append` needs for ``num_tokens`` after ``node``.

        ``claimed_slots`` collects slots whose spare room an earlier request of the same batch may use,
        so each slot's room is counted once.
        """
        room = 0
        if node.slot not in claimed_slots:
            room = self.slot_room(node)
            if room:
                claimed_slots.add(node.slot)
        rest = max(0, num_tokens - room)
        return cdiv(rest, self.chunk_size)

    def _take_slot(self) -> int:
        if not self._free_slots:
            self.ensure_free(1)
        return self._free_slots.pop()

    # ------------------------------------------------------------------ references
    def touch(self, node: Node) -> None:
        """Mark ``node`` and its ancestors as used now (for LRU)."""
        self._clock += 1
        n: Node | None = node
        while n is not None and n.parent is not None:
            n.last_access = self._clock
            n = n.parent

    def lock(self, node: Node, stop: Node | None = None) -> None:
        """Add one reference to ``node`` and every ancestor (up to, not including, ``stop``)."""
        n: Node | None = node
        while n is not None and n.parent is not None and n is not stop:
            if n.ref_count == 0 and n.start == 0:
                self._num_live_slots += 1
            n.ref_count += 1
            n = n.parent

    def slots_lock_makes_live(self, node: Node) -> list[int]:
        """The slots that :meth:`lock` of ``node`` would make live (taking them from the evictable ones): those
        of the unreferenced chunks on its path that own their slot. Reference counts never grow down a path, so
        they are the path's unreferenced tail."""
        slots = []
        n: Node | None = node
        while n is not None and n.parent is not None and n.ref_count == 0:
            if n.start == 0:
                slots.append(n.slot)
            n = n.parent
        return slots

    def unlock(self, node: Node) -> None:
        """Drop one reference from ``node`` and every ancestor; chunks reaching 0 become evictable leaves."""
        n: Node | None = node
        while n is not None and n.parent is not None:
            assert n.ref_count > 0, n
            n.ref_count -= 1
            if n.ref_count == 0:
                if n.start == 0:
                    self._num_live_slots -= 1
                if not n.children:
                    self._push_candidate(n)
            n = n.parent

    # ------------------------------------------------------------------ eviction
    def _push_candidate(self, node: Node) -> None:
        heapq.heappush(self._candidates, (self.policy.priority(node), node.id, node))

    def _remove_leaf(self, leaf: Node) -> None:
        parent = leaf.parent
        assert parent is not None and not leaf.children and leaf.ref_count == 0
        assert leaf.start + len(leaf) == self._slot_fill[leaf.slot], "only a slot's last chunk can be a leaf"
        del parent.children[leaf.tokens[0]]
        leaf.parent = None
        self._slot_fill[leaf.slot] = leaf.start
        if leaf.start == 0:
            self._slot_head[leaf.slot] = None
            self._free_slots.append(leaf.slot)
        self.version += 1
        if parent.parent is None:
            self._drop_root_if_unused(parent)
        elif not parent.children and parent.ref_count == 0:
            self._push_candidate(parent)

    def ensure_free(self, num_slots: int) -> None:
        """Evict retained chunks, leaves in the policy's order, until ``num_slots`` slots are free.

        Leaves whose slot holds a referenced chunk are skipped (evicting them would free nothing).
        Raises :class:`CacheFullError` (having evicted nothing it did not have to) if it cannot.
        """
        if num_slots > self.num_free_slots + self.num_evictable_slots:
            raise CacheFullError(
                f"need {num_slots} free chunks, have {self.num_free_slots} free and "
                f"{self.num_evictable_slots} evictable of {self.num_slots}"
            )
        kept: list[_HeapEntry] = []
        while self.num_free_slots < num_slots:
            if not self._candidates:
                self._rebuild_candidates()
                kept = []
                assert self._candidates, "evictable slots counted but no evictable leaf found"
            entry = heapq.heappop(self._candidates)
            priority, _, leaf = entry
            if leaf.parent is None or leaf.children or leaf.ref_count:
                continue  # stale entry: evicted, grew children or referenced since it was pushed
            if priority != self.policy.priority(leaf):
                self._push_candidate(leaf)  # its priority changed (read again since): requeue in order
                continue
            head = self._slot_head[leaf.slot]
            assert head is not None
            if head.ref_count:
                kept.append(entry)
                continue
            self._remove_leaf(leaf)
        for entry in kept:
            heapq.heappush(self._candidates, entry)

    def _rebuild_candidates(self) -> None:
        self._candidates = [(self.policy.priority(n), n.id, n) for n in self.nodes()
                            if not n.children and n.ref_count == 0]
        heapq.heapify(self._candidates)

    def evict_unreferenced(self, node: Node) -> None:
        """Remove ``node`` and its ancestors while they are unreferenced leaves (no retention)."""
        n: Node | None = node
        while n is not None and n.parent is not None and not n.children and n.ref_count == 0:
            parent = n.parent
            self._remove_leaf(n)
            n = parent

    def evict_all(self) -> int:
        """Drop every retained chunk; return the number of slots freed."""
        before = self.num_free_slots
        self._rebuild_candidates()
        while self._candidates:
            _, _, leaf = heapq.heappop(self._candidates)
            if leaf.parent is not None and not leaf.children and leaf.ref_count == 0:
                self._remove_leaf(leaf)
        return self.num_free_slots - before

    # ------------------------------------------------------------------ validation
    def check(self, expected_refs: dict[int, int]) -> None:
        """Validate every structural invariant; ``expected_refs`` maps node id -> live references."""

        def fail(msg: str) -> None:
            raise CacheCorruptedError(msg)

        c = self.chunk_size
        segments: dict[int, list[Node]] = {}
        for node in self.nodes():
            parent = node.parent
            if parent is None or parent.children.get(node.tokens[0] if node.tokens else -1) is not node:
                fail(f"{node} is not its parent's child under its first token")
            assert parent is not None
            if not node.tokens:
                fail(f"{node} holds no tokens")
            if node.pos != parent.end_pos:
                fail(f"{node} pos {node.pos} != parent end {parent.end_pos}")
            if not (0 <= node.slot < self.num_slots) or node.start < 0 or node.start + len(node) > c:
                fail(f"{node} lies outside its slot")
            if node.ref_count != expected_refs.get(node.id, 0):
                fail(f"{node} ref_count {node.ref_count} != {expected_refs.get(node.id, 0)} live references")
            if node.ref_count > parent.ref_count and parent.parent is not None:
                fail(f"{node} has more references than its parent")
            segments.setdefault(node.slot, []).append(node)
        free = set(self._free_slots)
        if len(free) != len(self._free_slots):
            fail("a slot is on the free list twice")
        live = 0
        for slot in range(self.num_slots):
            segs = sorted(segments.get(slot, []), key=lambda n: n.start)
            if slot in free:
                if segs or self._slot_fill[slot] or self._slot_head[slot] is not None:
                    fail(f"free slot {slot} is in use")
                continue
            if not segs:
                fail(f"slot {slot} is held but holds no chunk")
            row = 0
            for i, seg in enumerate(segs):
                if seg.start != row:
                    fail(f"slot {slot} has a gap or overlap at row {row}")
                if i and seg.parent is not segs[i - 1]:
                    fail(f"slot {slot}: {seg} does not follow its parent in the slot")
                if i < len(segs) - 1 and not seg.children:
                    fail(f"slot {slot}: leaf {seg} is not the slot's last chunk")
                row += len(seg)
            if row != self._slot_fill[slot]:
                fail(f"slot {slot} fill {self._slot_fill[slot]} != {row}")
            if self._slot_head[slot] is not segs[0]:
                fail(f"slot {slot} head is not its row-0 chunk")
            live += segs[0].ref_count > 0
        if live != self._num_live_slots:
            fail(f"live slot count {self._num_live_slots} != {live}")
        for root_id, users in self._root_users.items():
            if users < 1 or root_id not in self._private_roots:
                fail(f"root {root_id} has {users} users but is not a known root")
        for root in self._private_roots.values():
            if not root.children and not self._root_users.get(root.id):
                fail(f"root {root.id} has neither chunks nor users but was kept")
        if any(self._private_roots.get(i) is not r for i, r in
               ((r.id, r) for r in self._namespaces.values())) or len(self._namespace_of) != len(self._namespaces):
            fail("namespace roots are out of step with the roots")
