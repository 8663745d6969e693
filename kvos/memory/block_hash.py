"""Stable identity of a KV block: a chained SHA-256 digest of everything its KV depends on.

    root = H("kvos-kv-v1" | model identity)           fixed per model, dtype, block size, layout
    salt = H(root | cache_salt)                       only when the request brings a salt
    h_0  = H(root-or-salt | token ids of block 0)
    h_i  = H(h_{i-1}   | token ids of block i)

The digest names the KV of a whole prefix, so two blocks with equal digests
hold equal KV (for one model) in any process, on any machine, after any
restart: what a prefix-aware router and a disk tier need. SHA-256 rather than
Python's `hash` because the latter is salted per process for strings and is
not collision-resistant: a client could otherwise choose prompts that collide
with someone else's prefix. A per-request `cache_salt` keeps tenants from
sharing or probing each other's prefixes (a hit is observable as latency).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

BlockHash = bytes

LAYOUT_VERSION = "kvos-kv-v1"


def root_hash(model_identity: str, block_size: int) -> BlockHash:
    """The chain's fixed root for one model's KV in blocks of `block_size` tokens."""
    return hashlib.sha256(f"{LAYOUT_VERSION}\0{model_identity}\0{block_size}".encode()).digest()


def salted_root(root: BlockHash, cache_salt: str | None) -> BlockHash:
    if cache_salt is None:
        return root
    return hashlib.sha256(root + b"salt\0" + cache_salt.encode("utf-8", "surrogatepass")).digest()


def chain_hashes(parent: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The digest of each full block of `token_ids` in turn (little-endian int64 ids), each block's parent
    the one before it and the first's `parent`; a partial last block is not digested. The ids are packed in
    one call (a prompt's blocks are digested together when it arrives, hundreds of them for a long prompt)."""
    packed = array("q", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    data = packed.tobytes()
    stride = 8 * block_size
    sha256 = hashlib.sha256
    digests = []
    for start in range(0, stride * (len(token_ids) // block_size), stride):
        parent = sha256(parent + data[start : start + stride]).digest()
        digests.append(parent)
    return digests
