"""Live migration in the simulator: the cluster's trigger and protocol, timed by a link, leaving no KV behind."""

from __future__ import annotations

import pytest

from kvos.cluster.migration import rebalance_move
from kvos.config import SchedulerConfig
from kvos.sim.metrics import summarize_sim
from kvos.sim.migration import MigrationConfig
from kvos.sim.simulator import FleetConfig, InstanceConfig, SimResult, Simulator
from kvos.sim.step_model import FrontEnd, LinearStepModel
from kvos.sim.worker import LinkModel
from kvos.sim.workload import SimRequest, arrival_times, with_arrivals

STEP_MODEL = LinearStepModel(
    prefill_intercept=0.02,
    decode_intercept=0.01,
    per_prefill_token=1e-4,
    per_attention_pair=0.0,
    per_context_token=0.0,
    per_decode=1e-3,
)
BLOCK = 16
LINK = LinkModel(bandwidth_bytes_per_s=1e6, kv_bytes_per_token=1000, latency_s=0.002)  # 16 ms a block


def fleet(num_blocks: int, migration: MigrationConfig | None, link: LinkModel = LINK) -> FleetConfig:
    instance = InstanceConfig(
        scheduler=SchedulerConfig(max_num_seqs=8),
        kv_capacity_tokens=num_blocks * BLOCK,
        block_size=BLOCK,
        max_model_len=1024,
    )
    return FleetConfig(instance, num_instances=2, router="round-robin", migration=migration, link=link)


def assert_nothing_left(result: SimResult, requests: list[SimRequest]) -> None:
    """Every request got all its tokens, and every instance ended with every block free and nothing in flight."""
    assert list(result.times.num_output_tokens) == [r.output_tokens for r in requests]
    for instance in result.instances:
        assert instance.kv.num_used_blocks == 0
        assert not instance.scheduler.requests and not instance._incoming and instance.num_detached == 0


def test_rebalance_move_picks_the_shortest_request_of_the_fullest_instance() -> None:
    lengths = {"a": [("a1", 300), ("a2", 120), ("a3", 120)], "b": [("b1", 10)], "c": []}
    freeness = [("a", 40.0), ("b", 90.0), ("c", 140.0)]
    # 140 - 40 = 100: at the gap it moves; ties of length go to the first listed, as min() takes them.
    assert rebalance_move(freeness, lambda i: lengths[i], gap=100.0) == ("a2", "a", "c")
    assert rebalance_move(freeness, lambda i: lengths[i], gap=100.5) is None
    # The fullest has nothing to move (all its requests moving already): nothing.
    assert rebalance_move([("c", 0.0), ("b", 500.0)], lambda i: lengths[i], gap=1.0) is None
    assert rebalance_move([("a", 0.0)], lambda i: lengths[i], gap=1.0) is None


def test_a_request_moves_to_the_freer_instance_and_every_block_comes_back() -> None:
    """Round-robin puts A and C (200 tokens each) on instance 0 and the short B on instance 1. The cluster
    core checks at its first step, right after the arrivals, counting what was routed: freeness
    (1024 - 400) / 2 = 312 against (1024 - 20) / 1 = 1004, past the gap of 100, so A (the first of two
    equal shortest) moves. Its snapshot waits for the prefill step's end (0.06 s), its 12 full blocks
    cross in 0.19 s while it decodes, a second stage copies the block it filled meanwhile, and the last
    one goes while it is stopped. Then each instance runs one request of equal freeness: no more moves."""
    requests = [SimRequest(0.0, 200, 300), SimRequest(0.0, 20, 2), SimRequest(0.0, 200, 300)]
    migration = MigrationConfig(freeness_gap=100.0, interval_s=0.5)
    moved = Simulator(fleet(64, migration), STEP_MODEL).run(requests)
    stayed = Simulator(fleet(64, None), STEP_MODEL).run(requests)
    (result,) = moved.migrations
    assert result.outcome == "migrated" and result.stages == 3
    # 12 blocks, then 1, then the partial last one: every block of A's ~220 tokens at its suspend, once.
    assert result.blocks_copied == 14
    # Downtime: the wait for the source's step boundary (at most one 12 ms step of two decodes), then the
    # last block (16 ms) and the link's latency.
    assert LINK.latency_s + 0.016 <= result.downtime_s <= LINK.latency_s + 0.016 + 0.012 + 1e-9
    assert_nothing_left(moved, requests)
    # Each then decodes alone (11 ms a step against 12 ms for two): both end sooner than unmoved.
    for k in (0, 2):
        assert moved.times.last_token_s[k] < stayed.times.last_token_s[k]
    assert moved.instances[1].num_steps > stayed.instances[1].num_steps  # A's steps after the move
    summary = summarize_sim(moved, ttft_slo_s=10.0, tpot_slo_s=1.0)["simulation"]["migrations"]
    assert summary["tried"] == 1 and summary["by_outcome"] == {"migrated": 1}
    assert summary["blocks_copied"] == result.blocks_copied
    assert summary["downtime_ms"]["p50"] == pytest.approx(1e3 * result.downtime_s)


def test_a_destination_without_room_changes_nothing() -> None:
    """Pool of 40 blocks; requests arrive at 0.05 s, after the first check. At the check at 0.5 s,
    instance 1 runs D (560 + ~34 tokens: 38 blocks, freeness 32) and instance 0 two requests of about
    135 tokens (freeness 176). D is the fullest instance's shortest request, but it needs 594 + 64
    headroom tokens, 42 blocks, more than instance 0 holds: "no_room". By the next check (1.0 s) all
    have ended. The run is the run without migration, token for token."""
    requests = [SimRequest(0.05, 100, 40), SimRequest(0.05, 560, 70), SimRequest(0.05, 100, 40)]
    migration = MigrationConfig(freeness_gap=100.0, interval_s=0.5)
    tried = Simulator(fleet(40, migration), STEP_MODEL).run(requests)
    plain = Simulator(fleet(40, None), STEP_MODEL).run(requests)
    assert [m.outcome for m in tried.migrations] == ["no_room"]
    assert tried.migrations[0].blocks_copied == 0
    for name in ("first_token_s", "last_token_s", "num_output_tokens"):
        assert getattr(tried.times, name) == getattr(plain.times, name), name
    assert_nothing_left(tried, requests)


def test_a_request_that_ends_while_its_kv_crosses_a_slow_link_stays_where_it_was() -> None:
    """A link of 10 ms a token: A's first stage (12 blocks, from its snapshot at 0.06 s) takes 1.9 s to
    cross, and A ends about 1.3 s in. The next snapshot finds it gone: "ended", the destination's
    reservation given back."""
    requests = [SimRequest(0.0, 200, 100), SimRequest(0.0, 20, 2), SimRequest(0.0, 200, 100)]
    slow = LinkModel(bandwidth_bytes_per_s=1e5, kv_bytes_per_token=1000)
    migration = MigrationConfig(freeness_gap=100.0, interval_s=0.5)
    result = Simulator(fleet(64, migration, slow), STEP_MODEL).run(requests)
    assert [m.outcome for m in result.migrations] == ["ended"]
    assert result.migrations[0].stages == 1
    assert_nothing_left(result, requests)


def test_migration_needs_a_positive_gap_and_interval() -> None:
    with pytest.raises(ValueError, match="freeness_gap must be > 0, got 0"):
        MigrationConfig(freeness_gap=0.0)
    with pytest.raises(ValueError, match="interval_s must be > 0, got -1"):
        MigrationConfig(freeness_gap=1.0, interval_s=-1.0)
    with pytest.raises(ValueError, match="give the fleet a link"):
        FleetConfig(num_instances=2, migration=MigrationConfig(1.0))


def test_the_command_line_builds_the_migration_kvos_serve_would_run() -> None:
    from kvos.entrypoints.cli import build_parser
    from kvos.sim.cli import make_fleet

    base = ["sim", "run", "--kv-bytes-per-token", "1000", "--migrate-on-imbalance", "50"]
    with pytest.raises(ValueError, match="--migrate-on-imbalance needs --link-bandwidth"):
        make_fleet(build_parser().parse_args(base))
    args = build_parser().parse_args([*base, "--link-bandwidth", "1e6", "--migration-interval", "0.25"])
    built = make_fleet(args)
    assert (built.migration, built.link) == (MigrationConfig(50.0, interval_s=0.25), LinkModel(1e6, 1000))
    assert make_fleet(build_parser().parse_args(["sim", "run"])).migration is None


def test_a_disaggregated_fleet_hands_each_request_to_the_decode_tier_by_live_migration() -> None:
    """One prefill and two decode instances, as `kvos serve --prefill-instances 1 --decode-instances 2`.
    Every request with more than its first token is handed off once: migrated, or "ended" when it
    finished on the prefill instance while its KV crossed the link (a 300-token prompt takes 0.3 s to
    cross, its 10 tokens 0.12 s to decode). The decode instances admit no prompt of their own."""
    lengths = [(100, 20), (40, 1), (300, 10)] * 10
    requests = with_arrivals(lengths, arrival_times(len(lengths), 5.0, seed=4))
    link = LinkModel(bandwidth_bytes_per_s=1e6, kv_bytes_per_token=1000, latency_s=0.01)  # 10 ms + 1 ms/token
    instance = InstanceConfig(block_size=BLOCK)
    split = FleetConfig(instance, num_instances=3, prefill_instances=1, link=link)
    result = Simulator(split, STEP_MODEL).run(requests)
    assert_nothing_left(result, requests)
    outcomes = [m.outcome for m in result.migrations]
    assert len(outcomes) == sum(r.output_tokens > 1 for r in requests)
    assert set(outcomes) == {"migrated", "ended"}
    assert outcomes.count("migrated") >= 10  # at least the 100-token prompts, whose 20 tokens outlast the copy
    prefill, *decode = result.instances
    assert all(i.kv.prefix_cache_stats()[0] == 0 for i in decode)  # nothing admitted: every request came by KV
    assert prefill.kv.prefix_cache_stats()[0] > 0
    assert all(i.num_steps > 0 for i in decode)


def test_a_disaggregated_fleet_passes_the_front_end_once_each_way() -> None:
    """A lone request: its arrival passes the front end once, into the prefill instance (the hand-off
    goes engine to engine), and each token, whichever instance made it, reaches the client
    `to_client_s` after its step: every time moves by the two delays, every gap stays."""
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    request = [SimRequest(0.0, 40, 40)]

    def run(front: FrontEnd) -> SimResult:
        fleet = FleetConfig(InstanceConfig(front_end=front), num_instances=2, prefill_instances=1, link=LINK)
        return Simulator(fleet, steps).run(request)

    bare, served = run(FrontEnd()), run(FrontEnd(to_engine_s=0.005, to_client_s=0.003))
    assert [m.outcome for m in served.migrations] == ["migrated"]
    assert served.instances[1].num_steps > 0
    assert served.times.first_token_s[0] == pytest.approx(0.005 + 0.020 + 0.003)
    assert served.times.last_token_s[0] == pytest.approx(bare.times.last_token_s[0] + 0.005 + 0.003)
    assert list(served.times.itl_s) == pytest.approx(list(bare.times.itl_s))


def test_disaggregation_needs_both_tiers_and_a_link() -> None:
    with pytest.raises(ValueError, match="1 to num_instances - 1 = 1 prefill instances, got 2"):
        FleetConfig(num_instances=2, prefill_instances=2, link=LINK)
    with pytest.raises(ValueError, match="give the fleet a link"):
        FleetConfig(num_instances=2, prefill_instances=1)


def test_a_reservation_that_evicts_cached_blocks_pays_their_write_back_before_the_next_step() -> None:
    """Pool of 8 blocks, host tier below. A finished 100-token request leaves its 6 full blocks cached;
    reserving 8 blocks for a request migrating in takes them, so 6 blocks (96 tokens) are written back
    first, at 1 ms a token: 96 ms that the engine's worker spends before its next step."""
    from kvos.core.request import Request
    from kvos.sampling_params import SamplingParams
    from kvos.sim.simulator import HostTierConfig, SimInstance
    from kvos.sim.worker import CopyModel

    host = HostTierConfig(64 * BLOCK, CopyModel(save_s_per_token=1e-3, load_s_per_token=2e-3))
    config = InstanceConfig(kv_capacity_tokens=8 * BLOCK, block_size=BLOCK, max_model_len=256, host=host)
    instance = SimInstance(config, STEP_MODEL)
    instance.inbox.append(Request("a", [7] * 100, SamplingParams(max_tokens=1, ignore_eos=True)))
    while instance.start_step(0.0) is not None:
        instance.finish_step()
    assert instance.kv.num_used_blocks == 0 and instance.worker.copy_s == 0.0
    incoming = Request("m", [9] * 120, SamplingParams(max_tokens=4, ignore_eos=True))
    assert instance.migration_reserve(incoming, 8 * BLOCK)
    assert instance.worker.copy_s == pytest.approx(6 * BLOCK * 1e-3)
    assert instance.kv.counters.blocks_demoted == 6
    instance.migration_cancel("m")
    assert instance.kv.num_used_blocks == 0 and not instance._incoming
    # The next step waits for them, and they are counted once.
    instance.inbox.append(Request("b", [5] * 16, SamplingParams(max_tokens=1, ignore_eos=True)))
    end = instance.start_step(1.0)
    assert end == pytest.approx(1.0 + 6 * BLOCK * 1e-3 + STEP_MODEL.prefill_intercept + 16 * 1e-4)
    instance.finish_step()
    assert instance.worker.copy_s == pytest.approx(6 * BLOCK * 1e-3)


def test_a_full_decode_tier_pushes_back_and_the_request_decodes_where_it_is() -> None:
    """Pools of 40 blocks. The first request's hand-off reserves 300 + 1 + 64 headroom tokens, 23 blocks,
    on the one decode instance; while it decodes there, the next requests' hand-offs find 17 free and end
    "no_room", so they run to their end on the prefill instance. (This run first stopped with "the
    scheduler planned nothing for 1000 steps": the prefill instance's waiting request needed the blocks
    of the request suspended for its move, and the simulated engine stepped empty plans at no time.)"""
    requests = [SimRequest(0.1 * k, 300, 100) for k in range(3)]
    instance = InstanceConfig(kv_capacity_tokens=40 * BLOCK, block_size=BLOCK, max_model_len=1024)
    split = FleetConfig(instance, num_instances=2, prefill_instances=1, link=LINK)
    result = Simulator(split, STEP_MODEL).run(requests)
    assert sorted(m.outcome for m in result.migrations) == ["migrated", "no_room", "no_room"]
    assert_nothing_left(result, requests)


def test_the_session_router_follows_a_move_but_not_a_hand_off() -> None:
    """A move between routable instances re-sticks the conversation there (as `ClusterCore` tells its
    router); a disaggregated hand-off goes to a decode instance, where no new request is routed."""
    from kvos.cluster.instance import InstanceLoad
    from kvos.cluster.routers import InstanceView
    from kvos.core.request import Request
    from kvos.sampling_params import SamplingParams
    from kvos.sim.router import make_router

    def views(request: Request, with_prefix: bool) -> list[InstanceView]:
        return [InstanceView(j, InstanceLoad(1000 * (j + 1), 0, 0, 0)) for j in range(2)]

    turn = Request("1", [1, 2, 3], SamplingParams(), tenant="alice")
    router = make_router("session", 2, 1.0)  # two routable instances; a third would be a decode instance
    assert router.route(turn, views) == 1
    router.on_move(turn, 1, 0)
    assert router.route(turn, views) == 0
    router.on_move(turn, 0, 2)  # a hand-off to decode instance 2
    assert router.route(turn, views) == 0
