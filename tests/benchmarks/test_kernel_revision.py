"""A kernel built at another revision registers under its own library, leaving kvos's ops alone."""

from __future__ import annotations

from pathlib import Path

from benchmarks.kernel_revision import renamed_library, time_alternating

REPO = Path(__file__).resolve().parents[2]


def test_only_the_named_library_is_renamed() -> None:
    int4 = (REPO / "kvos/model/csrc/int4_linear.cpp").read_text()
    out = renamed_library(int4, "kvos")
    assert "TORCH_LIBRARY_FRAGMENT(kvos_base, m)" in out and "TORCH_LIBRARY_IMPL(kvos_base, CPU, m)" in out
    assert "(kvos," not in out

    amx = (REPO / "kvos/model/csrc/amx_linear.cpp").read_text()
    assert renamed_library(amx, "kvos") == amx  # its library is kvos_amx
    out = renamed_library(amx, "kvos_amx")
    assert "TORCH_LIBRARY(kvos_amx_base, m)" in out and "TORCH_LIBRARY_IMPL(kvos_amx_base, CPU, m)" in out


def test_the_passes_take_turns_and_the_warm_up_rounds_are_not_timed() -> None:
    calls: list[str] = []
    medians = time_alternating(
        {"base": lambda: calls.append("base"), "head": lambda: calls.append("head")}, 3, warmup=1
    )
    assert calls == ["base", "head", "head", "base", "base", "head", "head", "base"]
    assert set(medians) == {"base", "head"}
