"""Instances on a real local Ray runtime: routing, streaming, drain, failover; tokens equal one engine's.

One Ray runtime and one three-instance cluster of a tiny random model serve
the whole module (starting them dominates its time); the chaos test, which
kills an instance, runs last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kvos.cluster.client import ClusterEngine  # noqa: E402
from kvos.cluster.cluster_core import ClusterCore  # noqa: E402
from kvos.cluster.config import ClusterConfig  # noqa: E402
from kvos.cluster.routers.prefix_aware import PrefixAwareRouter  # noqa: E402
from kvos.cluster.routers.round_robin import RoundRobinRouter  # noqa: E402
from kvos.config import EngineConfig  # noqa: E402
from kvos.engine.llm_engine import LLMEngine  # noqa: E402
from kvos.sampling_params import SamplingParams  # noqa: E402
from tests.engine.test_engine_dummy import write_config  # noqa: E402

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def prompt(i: int, length: int = 6) -> list[int]:
    return [(7 * i + 3 * j) % 5000 + 10 for j in range(length)]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> EngineConfig:
    path = write_config(tmp_path_factory.mktemp("tiny"))
    return EngineConfig.from_kwargs(
        model=path, load_format="dummy", kv_cache_memory_bytes=4 * 2**20, max_num_batched_tokens=512, dtype="float32"
    )


@pytest.fixture(scope="module")
def reference(config: EngineConfig):
    """Greedy tokens of one in-process engine: what every cluster run must produce."""
    engine = LLMEngine(config)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
        todo = [p for p in prompts if (tuple(p), max_tokens) not in cache]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(todo):
            engine.add_request(f"ref{i}", p, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    cache[(tuple(todo[int(out.req_id[3:])]), max_tokens)] = out.outputs[0].token_ids
        return [cache[(tuple(p), max_tokens)] for p in prompts]

    return run


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk")


@pytest.fixture(scope="module")
def cluster(config: EngineConfig, disk_dir: Path) -> Iterator[ClusterEngine]:
    """Three instances, each with a disk KV tier under the one directory the server is given."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tiered = dataclasses.replace(
        config, cache=dataclasses.replace(config.cache, kv_disk_path=str(disk_dir), kv_disk_bytes=2**20)
    )
    engine = ClusterEngine(tiered, ClusterConfig(instances=3, router="round-robin", threads_per_instance=1))
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()
        ray.shutdown()


def run_all(cluster: ClusterEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Stream every prompt through the EngineClient; check each stream only ever grows."""

    async def one(i: int, p: list[int]) -> list[int]:
        stream = await cluster.add_request(f"req-{time.monotonic_ns()}-{i}", p, params)
        seen: list[int] = []
        async for out in stream:
            tokens = out.outputs[0].token_ids
            assert tokens[: len(seen)] == seen, "a stream went back on a token"
            seen = list(tokens)
        return seen

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(main())


def core(cluster: ClusterEngine) -> ClusterCore:
    return cluster.cluster


def assert_all_kv_freed(cluster: ClusterEngine) -> None:
    core(cluster).refresh()
    per_instance = core(cluster).instance_stats()
    assert per_instance and all(s.num_used_blocks == 0 and s.num_running == 0 for s in per_instance.values())


def test_streams_through_the_router_equal_one_engine(cluster: ClusterEngine, reference) -> None:
    prompts = [prompt(i) for i in range(9)]
    assert run_all(cluster, prompts) == reference(prompts)
    served = [s.num_prompt_tokens for s in core(cluster).instance_stats().values()]
    assert len(served) == 3 and all(n > 0 for n in served)  # round-robin spread them over all three
    assert_all_kv_freed(cluster)


def test_each_instance_keeps_its_own_disk_tier(cluster: ClusterEngine, disk_dir: Path) -> None:
    """One directory given, one engine per directory allowed: every instance took its own inside it."""
    assert {info["id"] for info in core(cluster).instances() if info["state"] == "healthy"} >= {0, 1, 2}
    for i in range(3):
        assert (disk_dir / f"instance-{i}" / "kvos.lock").exists()


def test_bad_input_is_refused_before_any_instance(cluster: ClusterEngine) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(cluster.add_request("bad", [1, 10**9], GREEDY))
    with pytest.raises(ValueError, match="context length"):
        asyncio.run(cluster.add_request("long", [1], SamplingParams(max_tokens=10**6)))


def test_n_siblings_stay_on_one_instance(cluster: ClusterEngine, reference) -> None:
    params = SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    async def main():
        stream = await cluster.add_request("siblings", prompt(40), params)
        async for out in stream:
            last = out
        return [c.token_ids for c in last.outputs]

    assert asyncio.run(main()) == reference([prompt(40)]) * 2
    assert_all_kv_freed(cluster)


def test_prefix_aware_routes_a_shared_prefix_to_the_instance_holding_it(cluster: ClusterEngine, reference) -> None:
    core(cluster).router = PrefixAwareRouter(overload_steps=1.0)
    try:
        shared = prompt(99, length=64)  # four full blocks
        before = {i: s.prefix_cache_hits for i, s in core(cluster).instance_stats().items()}
        run_all(cluster, [shared + [11]])
        followups = [shared + [12 + i] for i in range(4)]
        assert run_all(cluster, followups) == reference(followups)
        core(cluster).refresh()
        after = {i: s.prefix_cache_hits for i, s in core(cluster).instance_stats().items()}
        gained = [after[i] - before.get(i, 0) for i in after]
        assert sorted(gained)[-1] >= 4 * 64 and sorted(gained)[:-1] == [0, 0]  # all on one instance, all hits
    finally:
        core(cluster).router = RoundRobinRouter()


def test_add_and_drain_under_load_lose_nothing(cluster: ClusterEngine, reference, disk_dir: Path) -> None:
    """...and the drained instance stops cleanly: the prompts' blocks it still cached are on its disk tier."""
    new_id = cluster.add_instance()
    deadline = time.monotonic() + 60
    while next(i["state"] for i in cluster.instances() if i["id"] == new_id) != "healthy":
        assert time.monotonic() < deadline, "the added instance never became healthy"
        time.sleep(0.2)
    assert not list((disk_dir / "instance-0").glob("*.kv"))
    prompts = [prompt(200 + i, length=40) for i in range(12)]  # two full blocks each
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main() -> list[list[int]]:
        streams = [await cluster.add_request(f"drain-{i}", p, long) for i, p in enumerate(prompts)]
        first = streams[0]
        async for out in first:  # some tokens are out before the drain
            if len(out.outputs[0].token_ids) >= 3:
                break
        migrations_before = len(core(cluster).migrations)
        moved = await asyncio.to_thread(cluster.drain_instance, 0)
        assert moved > 0  # instance 0 was serving some of them
        assert [r.outcome for r in core(cluster).migrations[migrations_before:]].count("migrated") > 0
        results = []
        for stream in streams:
            tokens = stream.output.outputs[0].token_ids if stream.output is not None else []
            async for out in stream:
                tokens = out.outputs[0].token_ids
            results.append(list(tokens))
        return results

    assert asyncio.run(main()) == reference(prompts, 40)
    assert [i["id"] for i in cluster.instances()] == [1, 2, new_id]
    assert list((disk_dir / "instance-0").glob("*.kv")), "a clean stop writes the cached blocks to disk"
    with pytest.raises(ValueError, match="no engine instance 0"):
        cluster.drain_instance(0)
    assert_all_kv_freed(cluster)


def test_live_migration_mid_stream_keeps_one_unbroken_stream(cluster: ClusterEngine, reference) -> None:
    prompts = [prompt(500, length=40), prompt(501, length=40)]
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        stream = await cluster.add_request(f"mig-{i}", prompts[i], long)
        seen: list[int] = []
        result = None
        async for out in stream:
            tokens = out.outputs[0].token_ids
            assert tokens[: len(seen)] == seen, "the stream went back on a token"
            seen = list(tokens)
            if result is None and len(seen) >= 5 * (i + 1):
                result = await asyncio.to_thread(core(cluster).migrate, f"mig-{i}")
                assert result is not None and result.outcome == "migrated", result
                assert result.blocks_copied >= 3 and result.downtime_s > 0
        assert result is not None
        return seen

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(one(0), one(1)))

    assert asyncio.run(main()) == reference(prompts, 200)
    assert_all_kv_freed(cluster)


def test_load_imbalance_triggers_a_migration(cluster: ClusterEngine, reference) -> None:
    class First:
        wants_prefix = False

        def __init__(self) -> None:
            self.moves: list[int] = []

        def choose(self, request, views):
            return min(v.instance_id for v in views)

        def forget(self, instance_id: int) -> None:
            pass

        def moved(self, request, instance_id: int) -> None:
            self.moves.append(instance_id)

    the_core = core(cluster)
    first = the_core.router = First()
    before = len(the_core.migrations)
    the_core.cluster = dataclasses.replace(the_core.cluster, migration_freeness_gap=1.0, migration_interval_s=0.05)
    try:
        prompts = [prompt(600 + i, length=30) for i in range(4)]
        long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        assert run_all(cluster, prompts, long) == reference(prompts, 50)
    finally:
        the_core.cluster = dataclasses.replace(the_core.cluster, migration_freeness_gap=None)
        the_core.router = RoundRobinRouter()
    migrated = sum(r.outcome == "migrated" for r in the_core.migrations[before:])
    assert migrated > 0
    assert len(first.moves) == migrated  # the router heard of every move (the session router re-sticks there)
    assert_all_kv_freed(cluster)


def test_chaos_an_instance_killed_mid_stream_loses_no_request(cluster: ClusterEngine, reference) -> None:
    prompts = [prompt(300 + i, length=5 + i % 7) for i in range(100)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = reference(prompts, 16)
    victim_id = core(cluster).instances()[0]["id"]
    victim = core(cluster)._instances[victim_id].handle

    async def one(i: int, p: list[int], started: asyncio.Event) -> list[int]:
        stream = await cluster.add_request(f"chaos-{i}", p, params)
        seen: list[int] = []
        async for out in stream:
            tokens = out.outputs[0].token_ids
            assert tokens[: len(seen)] == seen
            seen = list(tokens)
            if len(seen) >= 4:
                started.set()
        return seen

    async def main() -> list[list[int]]:
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(i, p, started)) for i, p in enumerate(prompts)]
        await started.wait()
        ray.kill(victim, no_restart=False)  # the process dies; Ray restarts it
        return list(await asyncio.gather(*tasks))

    resumed_before = core(cluster).num_resumed
    assert asyncio.run(main()) == expected
    assert core(cluster).num_resumed > resumed_before  # the victim was serving some of them
    state = next(i for i in cluster.instances() if i["id"] == victim_id)
    assert state["restarts"] == 1
    deadline = time.monotonic() + 60
    while next(i for i in cluster.instances() if i["id"] == victim_id)["state"] != "healthy":
        assert time.monotonic() < deadline, "the killed instance never came back"
        time.sleep(0.2)
    assert run_all(cluster, prompts[:6], params) == expected[:6]
    assert_all_kv_freed(cluster)


def test_disaggregated_prefill_and_decode_equal_colocated(
    config: EngineConfig, cluster: ClusterEngine, reference
) -> None:
    """Runs last: its own cluster, one prefill and one decode instance, on the module's Ray runtime."""
    cluster.shutdown()  # free the module cluster's instances first (this machine's cores are few)
    disaggregated = ClusterEngine(
        config, ClusterConfig(prefill_instances=1, decode_instances=1, threads_per_instance=1)
    )
    disaggregated.start()
    try:
        prompts = [prompt(700 + i, length=20 + i) for i in range(6)]
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        assert run_all(disaggregated, prompts, long) == reference(prompts, 40)
        handoffs = [r.outcome for r in disaggregated.cluster.migrations]
        assert handoffs.count("migrated") == len(prompts)
        roles = {i["id"]: i["role"] for i in disaggregated.instances()}
        disaggregated.cluster.refresh()
        stats = disaggregated.cluster.instance_stats()
        prefill_id = next(i for i, r in roles.items() if r == "prefill")
        decode_id = next(i for i, r in roles.items() if r == "decode")
        assert stats[prefill_id].num_prompt_tokens == sum(len(p) for p in prompts)
        assert stats[decode_id].num_prompt_tokens == 0  # it computed no prompt: the KV came over
        assert stats[decode_id].num_generation_tokens > stats[prefill_id].num_generation_tokens
        assert all(s.num_used_blocks == 0 for s in stats.values())
    finally:
        disaggregated.shutdown()
