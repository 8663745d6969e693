"""The worker's KV memory as the random tests shadow it: what each slot holds, named by the tokens whose KV it is.

`tests/core/test_scheduler_random.py` (moves on a copy thread that lags
behind the steps, injected failures) and `tests/sim/test_sim_random.py`
(inside the simulator, moves at once, live migration) run the real scheduler
and KV books without a model. Both keep a `ShadowKV`: per slot of the pool
and of the host tier, and per disk file, the value of the KV it holds (None:
never written, or garbage); each request's block table as the worker keeps
it; and the value each of its positions must hold, which depends on its
tokens up to there and nothing else (a chain of hashes). A forward pass
writes every scheduled request's new positions, then checks that each reads
its own KV at every position, as attention would.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvos.core.plan import CopyKV, LoadFromDisk, LoadFromHost, SaveToDisk, SaveToHost, ScheduledRequest, StepPlan


class ShadowKV:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.pool: dict[int, object] = {}
        self.host: dict[int, object] = {}
        self.disk: dict[bytes, list[object]] = {}
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.values: dict[str, list[object]] = {}

    def begin(self, plan: StepPlan) -> None:
        """What the worker does with a plan before any move: drop, adopt, forget preempted tables, take the
        tables of requests whose KV comes up from the host tier."""
        for req_id in plan.finished_req_ids:
            for books in (self.tables, self.tokens, self.values):
                books.pop(req_id, None)
        for data in plan.new_requests:
            self.tables[data.req_id] = []
            self.tokens[data.req_id] = []
            self.values[data.req_id] = []
            for token in [*data.prompt_token_ids, *data.output_token_ids]:
                self.append(data.req_id, token)
        for req_id in plan.preempted_req_ids:
            if req_id in self.tables:
                self.tables[req_id] = []
        for kv_load in plan.kv_loads:
            self.set_table(kv_load.req_id, kv_load.table_update.start, kv_load.table_update.block_ids)
        for scheduled in plan.scheduled:
            if scheduled.table_update is not None:
                self.set_table(scheduled.req_id, scheduled.table_update.start, scheduled.table_update.block_ids)

    def append(self, req_id: str, token: int) -> None:
        values = self.values[req_id]
        self.tokens[req_id].append(token)
        values.append(hash((values[-1] if values else None, token)))

    def set_table(self, req_id: str, start: int, block_ids: Sequence[int]) -> None:
        table = self.tables[req_id]
        del table[start:]
        table.extend(block_ids)

    # -- moves between tiers ----------------------------------------------------------------

    def tier(self, name: str) -> dict[int, object]:
        return self.pool if name == "primary" else self.host

    def copy_blocks(self, src: str, src_block: int, dst: str, dst_block: int, num_blocks: int = 1) -> None:
        bs, source, target = self.block_size, self.tier(src), self.tier(dst)
        for i in range(num_blocks * bs):
            target[dst_block * bs + i] = source.get(src_block * bs + i)

    def scribble(self, tier: str, block_id: int) -> None:
        """The block's KV is garbage now (a load that failed half-way, say)."""
        for i in range(self.block_size):
            self.tier(tier)[block_id * self.block_size + i] = None

    def save_down(
        self, drops: Sequence[bytes], disk_saves: Sequence[SaveToDisk], saves: Sequence[SaveToHost], failed: set[bytes]
    ) -> None:
        """The worker's saves job: disk drops and writes (but the `failed` ones), then write-backs to the host."""
        bs = self.block_size
        for key in drops:
            self.disk.pop(key, None)
        for op in disk_saves:
            if op.key not in failed:
                self.disk[op.key] = [self.tier(op.tier).get(op.block_id * bs + i) for i in range(bs)]
        for save in saves:
            self.copy_blocks("primary", save.block_id, "host", save.host_block_id, save.num_blocks)

    def load_from_host(self, ops: Sequence[LoadFromHost]) -> None:
        for op in ops:
            self.copy_blocks("host", op.host_block_id, "primary", op.block_id, op.num_blocks)

    def load_from_disk(self, op: LoadFromDisk, corrupt: bool = False) -> str | None:
        """Read a file into its block; why it failed ("missing", "corrupt": the block holds garbage) or None."""
        data = self.disk.get(op.key)
        if data is None or corrupt:
            self.scribble(op.tier, op.block_id)
            return "missing" if data is None else "corrupt"
        for i, value in enumerate(data):
            self.tier(op.tier)[op.block_id * self.block_size + i] = value
        return None

    def copy(self, copies: Sequence[CopyKV]) -> None:
        for op in copies:
            data = [self.pool.get(op.src_slot + i) for i in range(op.num_slots)]
            for i, value in enumerate(data):
                self.pool[op.dst_slot + i] = value

    def read_blocks(self, block_ids: Sequence[int]) -> list[object]:
        bs = self.block_size
        return [self.pool.get(b * bs + i) for b in block_ids for i in range(bs)]

    def write_blocks(self, block_ids: Sequence[int], data: list[object]) -> None:
        bs = self.block_size
        for j, b in enumerate(block_ids):
            for i in range(bs):
                self.pool[b * bs + i] = data[j * bs + i]

    # -- the forward pass -------------------------------------------------------------------

    def forward(self, scheduled: Sequence[ScheduledRequest], unread: frozenset[str] = frozenset()) -> None:
        """Every layer writes the whole batch's new KV before any request reads (a request admitted in this
        step may read blocks another one fills in it): write all, then check every read.

        Requests in `unread` hold blocks a skipped load left unfilled (the worker fails them): they write
        garbage, and what they read is not checked."""
        for chunk in scheduled:
            start, n = chunk.num_computed_tokens, len(chunk.new_token_ids)
            assert chunk.new_token_ids == self.tokens[chunk.req_id][start : start + n], f"{chunk.req_id}: wrong tokens"
            self.write(chunk, garbage=chunk.req_id in unread)
        for chunk in scheduled:
            if chunk.req_id in unread:
                continue
            values = self.values[chunk.req_id]
            for p in range(chunk.num_computed_tokens + len(chunk.new_token_ids)):
                got = self.pool.get(self.slot(chunk.req_id, p))
                assert got == values[p], f"request {chunk.req_id} reads another's KV at position {p}"

    def write(self, chunk: ScheduledRequest, garbage: bool = False) -> None:
        start = chunk.num_computed_tokens
        for p in range(start, start + len(chunk.new_token_ids)):
            self.pool[self.slot(chunk.req_id, p)] = None if garbage else self.values[chunk.req_id][p]

    def slot(self, req_id: str, position: int) -> int:
        table, bs = self.tables[req_id], self.block_size
        assert position // bs < len(table), f"{req_id}: table of {len(table)} blocks for position {position}"
        return table[position // bs] * bs + position % bs
