"""Simulations whose every result `tests/sim/test_native.py` compares between the compiled build and the Python.

Run as a script, in a process of its own, because the compiled modules must
load before anything imports the Python ones:
`python tests/sim/native_runs.py compiled|python OUT.json`. It writes the
file each of `native.MODULES` was loaded from and, for each fleet below,
every request's token times and every instance's counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests.sim.test_simulator`
from kvos.sim import native  # noqa: E402

if sys.argv[1] == "compiled" and native.activate() is None:
    sys.exit("no compiled build for these sources")

# After the choice above: these imports load whichever build it made (the test module's too).
from kvos.config import SchedulerConfig  # noqa: E402
from kvos.sim.migration import MigrationConfig  # noqa: E402
from kvos.sim.simulator import (  # noqa: E402
    DiskTierConfig,
    FleetConfig,
    HostTierConfig,
    InstanceConfig,
    Simulator,
    VirtualCacheConfig,
)
from kvos.sim.worker import CopyModel, LinkModel  # noqa: E402
from kvos.sim.workload import SimRequest  # noqa: E402
from tests.sim.test_simulator import STEP_MODEL, conversations, workload  # noqa: E402

LINK = LinkModel(1e6, 100, 1e-3)


def instance(policy: str = "fcfs", kv_tokens: int = 24 * 16, **extra: Any) -> InstanceConfig:
    scheduler = SchedulerConfig(policy=policy, max_num_batched_tokens=64, max_num_seqs=8)  # type: ignore[arg-type]
    return InstanceConfig(scheduler=scheduler, kv_capacity_tokens=kv_tokens, max_model_len=128, **extra)


VIRTUAL = VirtualCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", page_size=4096)
COPY = CopyModel(1e-4, 2e-4)
FLEETS = {
    # Few blocks: preemption; the priority policy reorders and preempts by priority; fair steps one at a time.
    "fcfs-preempting": FleetConfig(instance(first_use_s=0.004)),
    "priority": FleetConfig(instance("priority")),
    "fair-2": FleetConfig(instance("fair", 64 * 16), 2),
    "least-requests-4": FleetConfig(instance(kv_tokens=40 * 16), 4, "least-requests"),
    "prefix-aware-3-chats": FleetConfig(instance(kv_tokens=64 * 16), 3, "prefix-aware"),
    "host-and-disk-tiers": FleetConfig(instance(host=HostTierConfig(8 * 16, COPY), disk=DiskTierConfig(96 * 16, COPY))),
    "virtual-cache": FleetConfig(instance(virtual=VIRTUAL)),
    "migration-3": FleetConfig(
        instance(kv_tokens=64 * 16), 3, migration=MigrationConfig(freeness_gap=20.0, interval_s=0.2), link=LINK
    ),
    "disaggregated-1p2d": FleetConfig(instance(kv_tokens=64 * 16), 3, prefill_instances=1, link=LINK),
}
WITH_CHATS = {"prefix-aware-3-chats", "host-and-disk-tiers", "migration-3"}


def results(name: str, fleet: FleetConfig) -> dict[str, Any]:
    sessions = conversations(seed=2, num=10) if name in WITH_CHATS else ()
    work = workload(seed=5, num=120, rate=12.0)
    if fleet.instance.scheduler.policy != "priority":
        work = [SimRequest(r.arrival_s, r.prompt_tokens, r.output_tokens, r.tenant) for r in work]
    result = Simulator(fleet, STEP_MODEL).run(work, sessions)
    times = result.times
    return {
        "first_token_s": list(times.first_token_s),
        "last_token_s": list(times.last_token_s),
        "num_output_tokens": list(times.num_output_tokens),
        "itl_s": sorted(times.itl_s),
        "rejected": times.rejected,
        "num_events": result.num_events,
        "migrations": [(m.outcome, m.stages, m.blocks_copied, m.downtime_s) for m in result.migrations],
        "instances": [
            {
                "steps": i.num_steps,
                "runs": i.num_runs,
                "preemptions": i.scheduler.num_preemptions,
                "peak_used_blocks": i.peak_used_blocks,
                "busy_s": i.worker.busy_s,
                "used_blocks_at_end": i.kv.num_used_blocks,
            }
            for i in result.instances
        ],
    }


def main() -> None:
    fleets = {name: results(name, fleet) for name, fleet in FLEETS.items()}
    loaded = {name: str(getattr(sys.modules.get(name), "__file__", None)) for name in native.MODULES}
    Path(sys.argv[2]).write_text(json.dumps({"loaded": loaded, "fleets": fleets}))


if __name__ == "__main__":
    main()
