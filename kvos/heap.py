"""Python's cyclic collector against the engine's long-lived heap.

What start-up leaves (torch, the model's modules, the tokenizer: a few
hundred thousand tracked objects) lives as long as the engine, and every full
collection walks all of it while holding the GIL: 115 ms each in `kvos
serve` (BENCHMARKS.md, session 23), 134 ms in an offline `LLM.generate`
whose steps are short (session 25). `gc.freeze` moves what is alive into a
generation the collector skips; objects made afterwards are collected as
before.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_heap() -> None:
    """Freeze everything alive now, for good, in a process that serves (everything is loaded).

    Not for a library call such as `LLM()`: it would freeze the caller's objects too; `frozen_heap` is
    for that.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze what is alive for the block's duration, and thaw it after: the caller's garbage is collected
    then, as if nothing had happened. Freezing and thawing move whole generations (no walk), so a short
    call pays nothing for it. Where something is frozen already (a server, or the caller's own
    `gc.freeze`), nothing is touched: thawing would undo theirs too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
