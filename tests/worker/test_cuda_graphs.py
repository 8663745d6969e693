"""Decode steps through `DecodeGraphs`' buffers, buckets and padding, against HF's greedy tokens.

There is no GPU here, so each "capture" hands back the step itself, run eagerly on the graph's
buffers: everything a replay depends on (the copies into the buffers, a bucket padded with its last
request, the fixed kernel tiles, the partition count chosen per step) runs as it would on a GPU, in
Triton's interpreter. scripts/gpu_targets.py runs the real captures on a lent GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from kvos import LLM
from kvos.attention import paged_triton
from kvos.worker.cuda_graphs import DecodeGraphs, Pool, Replay, graph_batch_sizes
from tests.conftest import GreedyFn
from tests.engine.test_engine_equivalence import TEXTS, check_against_hf

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not paged_triton.interpreted(), reason="the CPU stand-in for a capture")


def eager(forward: Callable[[], torch.Tensor], pool: Pool | None) -> tuple[Replay, Pool | None]:
    return forward, pool


def graphed_llm(batch_sizes: list[int]) -> tuple[LLM, DecodeGraphs, Counter[tuple[int, int]]]:
    """SmolLM2 in float32 through the Triton kernel, its decode steps through DecodeGraphs; the counter
    counts replays per (bucket, partitions)."""
    llm = LLM(attention_backend="paged_triton", kv_cache_memory_bytes=64 * 2**20, dtype="float32", max_model_len=128)
    core = llm.engine._local_core()
    worker = core.worker
    graphs = DecodeGraphs(
        worker.model,
        worker.kv_buffer.kv_caches,
        core.kv_manager.table_block_size,
        core.max_model_len,
        batch_sizes,
        torch.device("cpu"),
    )
    graphs.capture_all(eager)
    replays: Counter[tuple[int, int]] = Counter()
    for key, replay in list(graphs._replays.items()):

        def counted(key: tuple[int, int] = key, replay: Replay = replay) -> torch.Tensor:
            replays[key] += 1
            return replay()

        graphs._replays[key] = counted
    worker.decode_graphs = graphs
    return llm, graphs, replays


def test_batch_buckets() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_a_batch_padded_to_its_bucket_keeps_hf_tokens(hf_smollm: GreedyFn) -> None:
    llm, graphs, replays = graphed_llm([1, 2, 4])
    assert graphs.splits == {1: [1], 2: [1], 4: [1]}  # a CPU never splits a context
    # Three requests that decode 12 tokens each (TEXTS[2] ends at its first token) in the bucket of four.
    check_against_hf(llm, [TEXTS[0], TEXTS[1], TEXTS[3]], hf_smollm)
    assert replays == {(4, 1): 11}  # every decode step replayed


def test_a_split_context_replays_the_graph_with_enough_partitions(
    hf_smollm: GreedyFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a GPU's rule (split the contexts of a launch of few programs) and 32-position partitions,
    two requests of 19 and 37 prompt tokens decode in the bucket of two with two partitions."""
    monkeypatch.setattr(paged_triton, "PARTITION", 32)

    def num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
        return 1 if max_context <= 32 or num_programs >= 8 else -(-max_context // 32)

    monkeypatch.setattr(paged_triton, "num_splits", num_splits)
    llm, graphs, replays = graphed_llm([1, 2, 4])
    # SmolLM2 has 3 kv heads: buckets 1 and 2 launch 3 and 6 programs, 4 launches 12.
    assert graphs.splits == {1: [1, 2, 4], 2: [1, 2, 4], 4: [1]}
    check_against_hf(llm, TEXTS[4:6], hf_smollm)
    assert replays == {(2, 2): 11}  # contexts of 38-49 positions: two partitions of 32
