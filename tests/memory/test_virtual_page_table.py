"""Policy of the virtual KV page table: best fit, deferred reclamation, budget, look-ahead."""

from __future__ import annotations

import pytest

from kvos.memory.virtual.page_table import SlotPageTable


class FakeMemory:
    """Records which row pages are committed, failing loudly on a double map or unmap."""

    def __init__(self, num_rows: int) -> None:
        self.pages: list[set[int]] = [set() for _ in range(num_rows)]
        self.calls: list[tuple[str, int, int, int]] = []

    def commit(self, row: int, first: int, count: int) -> None:
        new = set(range(first, first + count))
        assert not new & self.pages[row], f"row {row}: pages {new & self.pages[row]} mapped twice"
        self.pages[row] |= new
        self.calls.append(("commit", row, first, count))

    def release(self, row: int, first: int, count: int) -> None:
        gone = set(range(first, first + count))
        assert gone <= self.pages[row], f"row {row}: unmapping unmapped pages {gone - self.pages[row]}"
        self.pages[row] -= gone
        self.calls.append(("release", row, first, count))


def make_table(num_rows: int = 4, budget_pages: int = 20, num_planes: int = 1) -> tuple[SlotPageTable, FakeMemory]:
    memory = FakeMemory(num_rows)
    table = SlotPageTable(
        num_rows=num_rows,
        row_pages=10,
        num_planes=num_planes,
        budget_pages=budget_pages,
        commit=memory.commit,
        release=memory.release,
    )
    return table, memory


def check_exact(table: SlotPageTable, memory: FakeMemory) -> None:
    """The table's word equals what is committed: a prefix of `mapped[row]` pages per row."""
    for row in range(table.num_rows):
        assert memory.pages[row] == set(range(table.mapped[row]))
    assert table.num_committed_pages == sum(table.mapped) * table.num_planes
    assert table.num_committed_pages <= table.budget_pages


def test_assign_grow_and_vacate_keep_pages_deferred() -> None:
    table, memory = make_table()
    assert table.assign(0, "a", 3)
    assert table.grow(0, 5)
    assert table.num_live_pages == 5
    table.vacate(0)
    assert table.num_live_pages == 0
    assert table.num_deferred_pages == 5  # still mapped, for the row's next tenant
    check_exact(table, memory)


def test_best_fit_prefers_tightest_covering_row_else_most_mapped() -> None:
    table, memory = make_table()
    for row, pages in enumerate([6, 2, 4]):
        table.assign(row, f"r{row}", pages)
        table.vacate(row)
    assert table.pick_row(3) == 2  # rows 0 (6) and 2 (4) cover 3; 4 is tighter
    assert table.pick_row(5) == 0
    assert table.pick_row(2) == 1
    assert table.pick_row(9) == 0  # nobody covers 9: reuse the most already mapped
    table.assign(0, "x", 9)
    assert memory.calls[-1] == ("commit", 0, 6, 3)  # only the missing pages are mapped
    check_exact(table, memory)


def test_pick_row_none_when_every_row_is_taken() -> None:
    table, _ = make_table(num_rows=2)
    table.assign(0, "a", 1)
    table.assign(1, "b", 1)
    assert table.pick_row(1) is None


def test_pressure_reclaims_idle_pages_tail_first() -> None:
    table, memory = make_table(budget_pages=10)
    table.assign(0, "a", 6)
    table.vacate(0)
    table.assign(1, "b", 3)
    assert table.grow(1, 7)  # needs 4 more: 10 - 9 committed leaves 1, so 3 come off row 0's tail
    assert table.mapped == [3, 7, 0, 0]
    assert ("release", 0, 3, 3) in memory.calls
    assert table.num_reclaimed_pages == 3
    check_exact(table, memory)


def test_short_of_memory_changes_nothing() -> None:
    table, memory = make_table(budget_pages=9)
    table.assign(0, "a", 4)
    table.assign(1, "b", 4)
    table.vacate(1)
    calls = list(memory.calls)
    assert not table.grow(0, 10)  # needs 6, only 1 free + 4 deferred
    assert memory.calls == calls and table.mapped[:2] == [4, 4]
    assert not table.assign(2, "c", 7)
    assert table.tenant[2] is None and memory.calls == calls
    check_exact(table, memory)


def test_look_ahead_uses_free_budget_only_and_skips_stale_jobs() -> None:
    table, memory = make_table(budget_pages=10)
    table.assign(0, "a", 2)
    table.assign(1, "b", 6)
    assert table.look_ahead(0, "a", 5) == 2  # only 2 pages are free; never reclaims for look-ahead
    assert table.needed[0] == 2 and table.mapped[0] == 4
    table.vacate(0)
    assert table.look_ahead(0, "a", 6) == 0  # row 0 has a new (no) tenant: the job is stale
    check_exact(table, memory)


def test_look_ahead_pages_of_live_rows_are_reclaimed_last() -> None:
    table, memory = make_table(budget_pages=10)
    table.assign(0, "a", 2)
    table.look_ahead(0, "a", 6)  # row 0: 2 needed + 4 ahead
    table.assign(1, "b", 1)
    table.vacate(1)
    assert table.assign(2, "c", 5)  # 3 free + 1 idle on row 1 + 1 of row 0's look-ahead
    assert table.mapped == [5, 0, 5, 0]
    assert table.needed[0] == 2
    check_exact(table, memory)


def test_planes_multiply_the_physical_pages() -> None:
    table, memory = make_table(budget_pages=12, num_planes=3)
    assert table.assign(0, "a", 4)
    assert table.num_committed_pages == 12
    assert not table.assign(1, "b", 1)
    check_exact(table, memory)


def test_budget_below_one_page_per_plane_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        make_table(budget_pages=2, num_planes=3)
