import hashlib

from kvos.memory.block_hash import chain_hashes, root_hash


def naive_chain(parent: bytes, token_ids: list[int], block_size: int) -> list[bytes]:
    """The digest chain as the layout defines it, written out: sha256(parent | little-endian int64 ids)."""
    digests = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids[start : start + block_size])
        parent = hashlib.sha256(parent + block).digest()
        digests.append(parent)
    return digests


def test_chain_hashes_is_the_layouts_digest_chain() -> None:
    root = root_hash("model", 4)
    # A negative id (the simulator's shared-prefix token) and one past int32; the partial last block is not digested.
    tokens = [5, -1, 2**40, 0, 7, 8, 9, 10, 11]
    expected = naive_chain(root, tokens, 4)
    assert len(expected) == 2
    assert chain_hashes(root, tokens, 4) == expected
    assert chain_hashes(root, tokens[:3], 4) == []
    # Continuing a chain from its last digest gives the same digests as digesting it whole.
    assert chain_hashes(expected[0], tokens[4:], 4) == expected[1:]
