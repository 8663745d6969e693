"""A discrete-event simulator that runs kvos's own scheduler, KV books and policies.

Only the worker is replaced: `SimWorker` answers each `StepPlan` with one
token per sampling request and a step time from a `StepTimeModel`, so the
decisions (admission, chunking, preemption, policy order) are exactly the
engine's, and only the clock is modelled. See docs/simulator.md.

The simulator is a repository tool, like `kvos bench`: it reuses the serving
benchmark's metrics and ShareGPT sampler from `benchmarks/`, so run it from
the repository root.
"""

from kvos.cluster.config import ROUTERS as CLUSTER_ROUTERS

ROUTERS = (*CLUSTER_ROUTERS, "least-requests")
"""The routers a simulated fleet can use: the cluster's, unchanged, and the simulator's own `least-requests`
(`kvos.sim.router`). Named here, apart from the routers, so the command line can list them without importing
the scheduler, which `kvos.sim.native` may still have to swap for its compiled build."""
