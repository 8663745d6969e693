"""The collector's view of the heap: frozen for good in a server, frozen for a call in `LLM.generate`."""

from __future__ import annotations

import gc
import weakref

import pytest

from kvos import LLM, SamplingParams
from kvos.heap import freeze_startup_heap, frozen_heap


class Node:
    other: object = None


def cycle() -> weakref.ref[Node]:
    """A garbage cycle only the cyclic collector can free; a weak reference tells when it is gone."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_frozen_startup_heap_still_collects_what_serving_makes() -> None:
    """`kvos serve` freezes what start-up left (so full collections stop walking it); cycles made after
    that, while serving, must still be freed."""
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # torch and kvos's modules at the least
        gone = cycle()
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_generate_leaves_the_callers_garbage_collectable() -> None:
    """`LLM.generate` freezes the heap while it runs; a cycle the caller dropped before the call is
    frozen with it, and must be freed after the call as it would have been."""
    llm = LLM(kv_cache_memory_bytes=2**26)
    gone = cycle()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def collected(obj: object) -> bool:
    """Whether the cyclic collector sees `obj`: in one of its generations, not frozen."""
    return any(o is obj for o in gc.get_objects())


def test_a_callers_own_freeze_is_left_alone() -> None:
    """The block neither freezes again nor thaws the caller's freeze. (Checked per object: the freeze
    count itself falls whenever a frozen object dies by reference counting, as temporaries do.)"""
    mine = Node()
    try:
        gc.freeze()
        assert not collected(mine)
        with frozen_heap():
            made_inside = Node()
            assert collected(made_inside)  # no second freeze
            assert not collected(mine)
        assert not collected(mine)  # not thawed by the block
    finally:
        gc.unfreeze()


def test_the_block_thaws_on_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
