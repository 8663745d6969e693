"""Routers pick instances as docs/cluster.md says: by turn, by Llumnix freeness, by cached prefix, by session."""

from __future__ import annotations

import pytest

from kvos.cluster.config import ClusterConfig
from kvos.cluster.instance import InstanceLoad
from kvos.cluster.routers import InstanceView, make_router
from kvos.core.request import Request
from kvos.sampling_params import SamplingParams


def request(tenant: str = "") -> Request:
    return Request("r", [1, 2, 3], SamplingParams(max_tokens=4), tenant=tenant)


def view(instance_id: int, free: int, running: int, head: int = 0, waiting: int = 0, prefix: int = 0) -> InstanceView:
    return InstanceView(instance_id, InstanceLoad(free, head, running, waiting), prefix)


def test_freeness_is_free_kv_after_the_queue_head_per_decode_step() -> None:
    assert InstanceLoad(1000, 200, 4, 1).freeness == (1000 - 200) / 4
    assert InstanceLoad(100, 0, 0, 0).freeness == 100  # an idle instance: one step's worth per token
    assert InstanceLoad(100, 300, 2, 1).freeness < 0  # the head alone does not fit


def test_round_robin_takes_turns_and_skips_missing_instances() -> None:
    router = make_router(ClusterConfig(router="round-robin"))
    views = [view(i, 1000, 0) for i in (0, 1, 2)]
    assert [router.choose(request(), views) for _ in range(4)] == [0, 1, 2, 0]
    assert router.choose(request(), [views[0], views[2]]) == 2


def test_least_load_goes_by_freeness_not_request_count() -> None:
    router = make_router(ClusterConfig(router="least-load"))
    # Instance 0 runs fewer requests, but a long queue head will eat its free KV.
    busy_looking = view(1, free=4000, running=8)
    short_of_memory = view(0, free=1000, running=2, head=900, waiting=1)
    assert router.choose(request(), [short_of_memory, busy_looking]) == 1
    assert router.choose(request(), [view(0, 1000, 2), view(1, 1000, 8)]) == 0


def test_prefix_aware_prefers_the_longest_cached_prefix_unless_overloaded() -> None:
    router = make_router(ClusterConfig(router="prefix-aware", prefix_overload_steps=10))
    views = [view(0, 5000, 1, prefix=0), view(1, 1000, 4, prefix=3), view(2, 1000, 4, prefix=5)]
    assert router.choose(request(), views) == 2
    overloaded = [views[0], views[1], view(2, free=30, running=4, prefix=5)]  # 7.5 decode steps < 10
    assert router.choose(request(), overloaded) == 1
    nothing_cached = [view(0, 500, 1), view(1, 5000, 1)]
    assert router.choose(request(), nothing_cached) == 1  # falls back to least-load


def test_session_sticks_to_one_instance_while_it_is_there() -> None:
    router = make_router(ClusterConfig(router="session"))
    views = [view(0, 1000, 0), view(1, 2000, 0)]
    first = router.choose(request("alice"), views)
    assert first == 1  # a new session goes to the least loaded
    loaded_now = [view(0, 5000, 0), view(1, 10, 9)]
    assert router.choose(request("alice"), loaded_now) == 1  # and stays there
    assert router.choose(request("bob"), loaded_now) == 0
    router.forget(1)  # instance 1 died
    assert router.choose(request("alice"), [view(0, 5000, 0)]) == 0
    assert router.choose(request("alice"), [view(0, 10, 9), view(1, 5000, 0)]) == 0  # re-stuck to 0
    assert router.choose(request(""), [view(0, 10, 9), view(1, 5000, 0)]) == 1  # no session: by load


def test_session_follows_its_request_when_it_migrates() -> None:
    """The conversation's KV, and the hold its request leaves when it ends, are where it moved."""
    router = make_router(ClusterConfig(router="session"))
    views = [view(0, 1000, 0), view(1, 2000, 0), view(2, 500, 0)]
    assert router.choose(request("alice"), views) == 1
    router.moved(request("alice"), 2)
    assert router.choose(request("alice"), views) == 2
    router.moved(request("bob"), 0)  # a conversation it never routed: nothing to follow
    assert router.choose(request("bob"), views) == 1  # by load


def test_cluster_config_refuses_half_a_disaggregation_and_counts_its_instances() -> None:
    with pytest.raises(ValueError, match="needs both --prefill-instances and --decode-instances"):
        ClusterConfig(prefill_instances=2)
    config = ClusterConfig(prefill_instances=1, decode_instances=2)
    assert config.instances == 3 and config.disaggregated and config.enabled
    assert not ClusterConfig().enabled and ClusterConfig(ray_address="auto").enabled
    assert ClusterConfig(instances=2, threads_per_instance=3).num_threads == 3
    with pytest.raises(ValueError, match="router must be one of"):
        ClusterConfig(router="random")  # type: ignore[arg-type]
