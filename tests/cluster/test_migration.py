"""Live migration between two engine instances, in one process (no Ray): tokens, every abort path, KV freed.

The protocol (`kvos.cluster.migration.migrate`) runs against two
`EngineInstance`s through a `call` that steps the source between stages (so
the request keeps decoding while it is staged) and can make any call fail as
if that instance had died.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvos.cluster.instance import EngineInstance
from kvos.cluster.migration import InstanceDied, migrate
from kvos.config import EngineConfig
from kvos.core.request import Request
from kvos.sampling_params import SamplingParams
from tests.engine.test_engine_dummy import write_config

MAX_TOKENS = 40
PROMPT = [(11 * j) % 4000 + 20 for j in range(70)]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> EngineConfig:
    path = write_config(tmp_path_factory.mktemp("tiny"))
    return EngineConfig.from_kwargs(
        model=path, load_format="dummy", kv_cache_memory_bytes=2 * 2**20, max_num_batched_tokens=32, dtype="float32"
    )


@pytest.fixture(scope="module")
def pair(config: EngineConfig) -> tuple[EngineInstance, EngineInstance]:
    return EngineInstance(config, frozenset(), 1), EngineInstance(config, frozenset(), 1)


def request(req_id: str, max_tokens: int = MAX_TOKENS) -> Request:
    return Request(req_id, list(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def run(instance: EngineInstance, tokens: dict[str, list[int]], steps: int | None = None) -> None:
    """Step until idle (or `steps` steps), collecting each request's tokens."""
    done = 0
    while instance.core.has_unfinished_requests() and (steps is None or done < steps):
        for update in instance.step().updates:
            tokens.setdefault(update.req_id, []).extend(update.new_token_ids)
        done += 1


@pytest.fixture(scope="module")
def expected(pair) -> list[int]:
    source, _ = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("reference"))
    run(source, tokens)
    return tokens["reference"]


def caller(
    source: EngineInstance,
    tokens: dict[str, list[int]],
    fail: str | None = None,
    before: Callable[[], Any] | None = None,
):
    """Runs methods directly; steps the source at every stage; `fail`: that method raises InstanceDied."""

    def call(instance: EngineInstance, method: str, *args: Any) -> Any:
        if method == fail:
            raise InstanceDied(method)
        if method == "migration_snapshot":
            run(source, tokens, steps=1)
            if before is not None:
                before()
        return getattr(instance, method)(*args)

    return call


def assert_idle(*instances: EngineInstance) -> None:
    for instance in instances:
        assert not instance.core.has_unfinished_requests()
        assert instance.core.stats().num_used_blocks == 0
        assert not instance.core._incoming


@pytest.mark.parametrize("after_steps", [1, 6, 30], ids=["during-prefill", "mid-decode", "near-the-end"])
def test_a_migrated_request_yields_the_unmigrated_tokens(pair, expected, after_steps: int) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=after_steps)
    committed: list[Request] = []

    def on_commit(state: Request) -> bool:
        # What the router does: emit the tokens the source made that it had not reported yet.
        tokens.setdefault("r", []).extend(state.output_token_ids[len(tokens.get("r", [])) :])
        committed.append(state)
        return True

    result = migrate(caller(source, tokens), source, destination, request("r"), len(PROMPT), on_commit)
    assert result.outcome == "migrated"
    assert result.stages >= 2 and result.blocks_copied >= len(PROMPT) // 16
    run(destination, tokens)
    run(source, tokens)  # frees the worker state of the released copy
    assert tokens["r"] == expected
    assert_idle(source, destination)


def test_destination_without_room_changes_nothing(pair, expected) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=4)
    huge = destination.core.kv_manager.capacity_tokens * 2
    result = migrate(caller(source, tokens), source, destination, request("r"), huge, lambda s: True)
    assert result.outcome == "no_room"
    assert destination.core.stats().num_used_blocks == 0
    run(source, tokens)
    assert tokens["r"] == expected
    assert_idle(source, destination)


def test_a_request_aborted_mid_migration_leaves_both_sides_clean(pair) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=4)
    result = migrate(
        caller(source, tokens, before=lambda: source.abort("r")), source, destination, request("r"), 80, lambda s: True
    )
    assert result.outcome == "ended"
    run(source, tokens)
    assert_idle(source, destination)


def test_a_request_that_finishes_mid_migration_ends_normally(pair, expected) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r", max_tokens=6))
    run(source, tokens, steps=4)
    result = migrate(caller(source, tokens), source, destination, request("r", 6), 80, lambda s: True)
    assert result.outcome == "ended"
    run(source, tokens)
    assert tokens["r"] == expected[:6]
    assert_idle(source, destination)


def test_aborted_between_commit_and_switch_is_dropped_at_the_destination(pair) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=4)
    result = migrate(caller(source, tokens), source, destination, request("r"), 80, lambda s: False)
    assert result.outcome == "aborted"
    run(destination, tokens)
    run(source, tokens)
    assert_idle(source, destination)


def test_destination_dying_at_commit_lets_the_source_go_on(pair, expected) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=4)
    call = caller(source, tokens, fail="migration_commit")
    result = migrate(call, source, destination, request("r"), 80, lambda s: True)
    assert result.outcome == "destination_died"
    # The real destination process would be gone with its reservation; this one was told to cancel.
    run(source, tokens)
    assert tokens["r"] == expected
    assert_idle(source, destination)


def test_source_dying_mid_migration_cancels_the_reservation(pair) -> None:
    source, destination = pair
    tokens: dict[str, list[int]] = {}
    source.add(request("r"))
    run(source, tokens, steps=4)
    result = migrate(
        caller(source, tokens, fail="migration_suspend"), source, destination, request("r"), 80, lambda s: True
    )
    assert result.outcome == "source_died"
    assert destination.core.stats().num_used_blocks == 0 and not destination.core._incoming
    source.abort("r")  # what the dead process would have lost anyway
    run(source, tokens)
    assert_idle(source, destination)


@pytest.mark.parametrize("host_blocks", [0, 2], ids=["disk", "host-and-disk"])
def test_blocks_a_reservation_evicts_reach_the_disk_tier_before_the_copy_overwrites_them(
    config: EngineConfig, pair, tmp_path, host_blocks: int
) -> None:
    """The destination's pool is full of two prompts' cached blocks: reserving room for the incoming request
    evicts them, and they go down to the disk tier (through a small host tier, or straight) with their own
    KV, not the incoming request's: every block file is the one an engine that only ran those prompts
    writes, though the request's KV is copied into the evicted blocks right after the reservation."""
    block_bytes = 16 * 2 * 2 * 2 * 16 * 4  # tokens x K and V x layers x kv heads x head dim x float32
    prompts = [[(7 * j + 13 * k) % 3000 + 100 for j in range(64)] for k in range(2)]  # 4 full blocks each
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)  # computes the prompt only

    def engine(disk: Path, pool_blocks: int) -> EngineInstance:
        tiers: dict[str, Any] = {"kv_disk_path": str(disk), "kv_disk_bytes": 64 * block_bytes}
        if host_blocks:
            tiers["kv_offload_bytes"] = host_blocks * block_bytes
        small = EngineConfig.from_kwargs(
            model=config.model.model,
            load_format="dummy",
            kv_cache_memory_bytes=pool_blocks * block_bytes,
            max_num_batched_tokens=32,
            dtype="float32",
            **tiers,
        )
        return EngineInstance(small, frozenset(), 1)

    def fill(instance: EngineInstance) -> None:
        for k, prompt in enumerate(prompts):
            instance.add(Request(f"p{k}", list(prompt), params))
            run(instance, {})

    reference = engine(tmp_path / "reference", 64)
    try:
        fill(reference)
    finally:
        reference.core.close()  # a clean close writes every cached block to disk
    written = {f.name: f.read_bytes() for f in (tmp_path / "reference").glob("*.kv")}
    assert len(written) == 8
    source, _ = pair
    destination = engine(tmp_path / "disk", 8)
    try:
        fill(destination)
        assert destination.core.kv_manager.allocator.num_cached_blocks == 8
        short = [(5 * j) % 3000 + 50 for j in range(20)]
        incoming = Request("r", short, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        source.add(incoming)
        tokens: dict[str, list[int]] = {}
        run(source, tokens, steps=4)
        again = Request("r", list(short), incoming.params)
        result = migrate(caller(source, tokens), source, destination, again, len(short), lambda state: True)
        assert result.outcome == "migrated"
        run(destination, tokens)
        run(source, tokens)
        assert destination.core.kv_manager.counters.blocks_to_disk > 0, "the reservation should evict to disk"
        assert_idle(source, destination)
    finally:
        destination.core.close()
    on_disk = {f.name: f.read_bytes() for f in (tmp_path / "disk").glob("*.kv")}
    assert set(written) <= set(on_disk), "the prompts' blocks are all on disk after a clean close"
    for name, data in written.items():
        assert on_disk[name] == data, f"block file {name} holds other KV"
