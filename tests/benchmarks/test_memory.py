"""The benchmarks' RSS figures: a process's own memory and its children's, idle and at peak."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.memory import RSSSampler, tree_rss_bytes

MIB = 2**20


def test_peak_counts_memory_touched_inside_the_block_and_idle_does_not() -> None:
    # A fresh process, so that no memory this test process freed earlier can serve the allocation.
    code = (
        "import sys, time; sys.stdin.readline(); b = bytearray(96 * 2**20); print('touched', flush=True); "
        "sys.stdin.readline()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        time.sleep(0.2)  # the interpreter has started
        sampler = RSSSampler(pid=child.pid, interval_s=0.01)
        idle = sampler.sample()
        assert idle is not None and idle > 0
        with sampler:
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "touched"
            # Held until the sampling thread has seen it (on a loaded machine it may start late).
            deadline = time.monotonic() + 10
            while (sampler.peak_bytes or 0) < idle + 80 * MIB and time.monotonic() < deadline:
                time.sleep(0.01)
        assert sampler.peak_bytes is not None
        assert sampler.peak_bytes >= idle + 80 * MIB
    finally:
        child.kill()
        child.wait()


def test_a_childs_memory_counts_towards_its_parent() -> None:
    code = "import sys, time; b = bytearray(64 * 2**20); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child_rss = tree_rss_bytes(child.pid)
        assert child_rss is not None and child_rss >= 64 * MIB
        own = tree_rss_bytes(os.getpid())
        assert own is not None
        # This test process's tree holds the child: its total is at least the child's.
        assert own >= child_rss
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_has_no_figure() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert tree_rss_bytes(child.pid) is None
