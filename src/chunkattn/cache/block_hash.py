"""Names for prefixes across processes: chained hashes of fixed-size token blocks.

Block ``i`` of a prompt is named by a hash chained over blocks ``0..i``, so equal names mean equal prefixes.
A replica's cache reports the names of what it holds (:meth:`PrefixKVCache.block_hashes`) and a router
computes them for a request (:func:`block_hashes`); both must agree bit for bit, in any process and version:
each link is a BLAKE2b digest (:func:`chain`), and a namespace (a tenant's cache salt) seeds the chain with
one too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def namespace_seed(namespace: str | None) -> int:
    """The chain's starting value: 0 for the common namespace, a stable 64-bit digest of a named one."""
    if namespace is None:
        return 0
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8).digest(), "little")


def chain(previous: int, block: tuple[int, ...]) -> int:
    """The name of a block following the prefix named ``previous``: the first 8 bytes (little-endian) of
    BLAKE2b over ``previous`` as 8 little-endian bytes then each token id as 8 little-endian bytes. A stated
    contract (the same value in every process, Python version and machine), pinned by a test; Python's
    ``hash`` of a tuple promises none across versions."""
    data = previous.to_bytes(8, "little") + struct.pack(f"<{len(block)}q", *block)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: str | None = None) -> list[int]:
    """Chained hashes of the prompt's full blocks: ``h[i]`` names ``token_ids[: (i + 1) * block_size]`` in
    ``namespace``."""
    hashes: list[int] = []
    h = namespace_seed(namespace)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = chain(h, tuple(token_ids[start : start + block_size]))
        hashes.append(h)
    return hashes
