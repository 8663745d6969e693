"""The worker's KV buffers: the budget is a ceiling, not memory taken at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Measured in a fresh process: in the test process, memory that earlier tests freed is
# still resident and may be handed out again, which would hide what the pool takes.
_MEASURE = """
import json, torch
from kvos.memory.shape import KVShape
from kvos.worker.kv_cache import PagedKVBuffer

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
num_slots = 2**16  # 4 layers x K,V x 64 Ki slots x 512 B = 256 MiB of budget
before = rss()
buffer = PagedKVBuffer(num_slots, shape)
started = rss() - before
for k_cache, v_cache in buffer.kv_caches:
    k_cache[: num_slots // 2] = 1.0  # half the slots written in every layer
    v_cache[: num_slots // 2] = 1.0
print(json.dumps({"started": started, "written": rss() - before}))
"""


def test_a_paged_pool_takes_memory_only_as_blocks_are_written() -> None:
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE],
        capture_output=True,
        text=True,
        check=True,
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
    ).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    assert measured["started"] < 16 * 2**20  # nothing committed at start-up
    assert 100 * 2**20 < measured["written"] < 200 * 2**20  # about half of the 256 MiB, now resident
