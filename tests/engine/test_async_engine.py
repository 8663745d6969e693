"""AsyncLLMEngine around a scripted fake engine: failures reach the right callers and the thread survives."""

from __future__ import annotations

import asyncio

import pytest

from kvos.config import EngineConfig
from kvos.engine.async_engine import AsyncLLMEngine
from kvos.engine.stats import EngineStats
from kvos.errors import EngineUnavailableError, QueueFullError, RequestFailedError
from kvos.outputs import CompletionOutput, RequestOutput
from kvos.sampling_params import SamplingParams


class FakeEngine:
    """Each request emits one token per step until max_tokens; `fail_next_step` makes one step raise."""

    model_name = "fake"
    max_model_len = 64
    config = EngineConfig()

    def __init__(self) -> None:
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.waiting: list[str] = []
        self.fail_next_step = False
        self.num_aborted = 0

    def add_request(
        self,
        req_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: str = "",
        session: object = None,
    ) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        self.requests[req_id] = ([], params)

    def abort_request(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is not None:
            self.num_aborted += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def close(self) -> None:
        self.closed = True

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outputs = []
        for req_id, (tokens, params) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= params.max_tokens
            finish = "length" if done else None
            completion = CompletionOutput(0, "x" * len(tokens), list(tokens), finish)
            outputs.append(RequestOutput(req_id, None, [1], [completion], done))
            if done:
                del self.requests[req_id]
        return outputs

    def stats(self) -> EngineStats:
        # No free running slot: every waiting request counts against max_waiting.
        return EngineStats(len(self.requests), len(self.waiting), 0, len(self.requests), 10, 0, 0, 0, 0, 0)


async def collect(engine: AsyncLLMEngine, req_id: str, max_tokens: int) -> RequestOutput:
    stream = await engine.add_request(req_id, [1], SamplingParams(max_tokens=max_tokens))
    last = None
    async for output in stream:
        last = output
    assert last is not None
    return last


def run(coro_fn, fake: FakeEngine, max_waiting: int | None = None):
    async def main():
        engine = AsyncLLMEngine(fake, max_waiting)  # type: ignore[arg-type]
        engine.start()
        try:
            return await coro_fn(engine)
        finally:
            engine.shutdown()

    return asyncio.run(main())


def test_outputs_reach_each_caller() -> None:
    async def body(engine: AsyncLLMEngine) -> list[RequestOutput]:
        return await asyncio.gather(*(collect(engine, f"r{i}", i + 1) for i in range(5)))

    outputs = run(body, FakeEngine())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
    assert all(o.finished for o in outputs)


def test_failed_step_fails_its_requests_and_the_engine_keeps_serving() -> None:
    fake = FakeEngine()

    async def body(engine: AsyncLLMEngine) -> RequestOutput:
        # Long enough that the fake engine (a step costs nothing) cannot finish it before the failure is set.
        stream = await engine.add_request("doomed", [1], SamplingParams(max_tokens=10**6))
        fake.fail_next_step = True
        with pytest.raises(RequestFailedError, match="engine failed") as failure:
            async for _ in stream:
                pass
        assert "boom" not in str(failure.value)  # internal exception text stays in the log
        return await collect(engine, "after", 3)

    assert run(body, fake).outputs[0].token_ids == [0, 1, 2]
    assert fake.num_aborted == 1


def test_value_error_reaches_the_caller() -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad", [], SamplingParams())

    run(body, FakeEngine())


def test_full_waiting_queue_is_refused() -> None:
    fake = FakeEngine()
    fake.waiting = ["a"]

    async def body(engine: AsyncLLMEngine) -> None:
        with pytest.raises(QueueFullError):
            await engine.add_request("r", [1], SamplingParams())

    run(body, fake, max_waiting=1)


def test_abort_frees_the_request() -> None:
    fake = FakeEngine()

    async def body(engine: AsyncLLMEngine) -> None:
        await engine.add_request("r", [1], SamplingParams(max_tokens=10**6))
        engine.abort("r")
        for _ in range(200):
            if not fake.requests:
                return
            await asyncio.sleep(0.01)

    run(body, fake)
    assert fake.requests == {} and fake.num_aborted == 1


def test_shutdown_ends_streams_and_refuses_new_requests() -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        stream = await engine.add_request("r", [1], SamplingParams(max_tokens=10**6))
        engine.begin_shutdown()
        outputs = [o async for o in stream]  # ends normally: cut, not broken
        assert outputs[-1].finished and outputs[-1].error is None
        assert outputs[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("late", [1], SamplingParams())

    run(body, FakeEngine())


def test_shutdown_grace_lets_running_requests_finish() -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        stream = await engine.add_request("r", [1], SamplingParams(max_tokens=20))
        engine.begin_shutdown(grace_s=30.0)
        outputs = [o async for o in stream]
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert len(outputs[-1].outputs[0].token_ids) == 20

    run(body, FakeEngine())


def test_requests_the_next_step_admits_are_not_counted_as_waiting() -> None:
    class SlotsFree(FakeEngine):
        def stats(self) -> EngineStats:
            return EngineStats(len(self.requests), len(self.waiting), 2, len(self.requests), 10, 0, 0, 0, 0, 0)

    fake = SlotsFree()
    fake.waiting = ["a", "b"]  # two wait, but two running slots are free: the queue is empty in effect

    async def body(engine: AsyncLLMEngine) -> None:
        await engine.add_request("r", [1], SamplingParams(max_tokens=1))

    run(body, fake, max_waiting=1)


def test_a_full_queue_refuses_the_least_urgent_waiting_request_for_an_urgent_one() -> None:
    from kvos import LLM

    llm = LLM(policy="priority", max_num_seqs=1, kv_cache_memory_bytes=16 * 2**20, dtype="float32")

    async def body(engine: AsyncLLMEngine) -> None:
        running = await engine.add_request("running", [1, 2], SamplingParams(max_tokens=200, ignore_eos=True), 0)
        # Wait until it is admitted (the one slot taken): a fixed sleep raced a slow first step on a cold machine.
        for _ in range(600):
            if engine.stats().num_running == 1:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().num_running == 1
        low = await engine.add_request("low", [1, 2], SamplingParams(max_tokens=2), priority=5)
        # The queue is judged on the counts of the last step: wait until they include "low".
        for _ in range(600):
            if engine.stats().num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):  # not more urgent than anyone waiting: refused itself
            await engine.add_request("also-low", [1, 2], SamplingParams(max_tokens=2), priority=5)
        urgent = await engine.add_request("urgent", [1, 2], SamplingParams(max_tokens=2), priority=-1)
        with pytest.raises(QueueFullError, match="more urgent"):
            async for _ in low:
                pass
        engine.abort("running")
        outputs = [o async for o in urgent]
        assert outputs[-1].outputs[0].finish_reason == "length"
        del running

    async def main() -> None:
        engine = AsyncLLMEngine(llm.engine, max_waiting=1)
        engine.start()
        try:
            await body(engine)
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert llm.engine.stats().num_used_blocks == 0


def test_build_loads_and_steps_the_engine_on_one_thread(tmp_path) -> None:
    """`build` loads the engine on the thread that steps it (OpenMP is slow on a second thread),
    serves requests there, and hands a load failure to the caller in the user's words."""
    import threading

    from tests.entrypoints.in_process import tiny_config, write_tiny_model

    config = tiny_config(write_tiny_model(tmp_path))
    threads_before = set(threading.enumerate())
    engine = AsyncLLMEngine.build(config)
    (engine_thread,) = set(threading.enumerate()) - threads_before
    assert engine_thread.name == "kvos-engine" and engine_thread is not threading.current_thread()

    async def main() -> list[int]:
        engine.start()
        try:
            stream = await engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
            outputs = [o async for o in stream]
            return outputs[-1].outputs[0].token_ids
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 5
    assert not engine_thread.is_alive()
    assert engine.engine.stats().num_used_blocks == 0

    with pytest.raises(ValueError, match="no-such-model"):
        AsyncLLMEngine.build(EngineConfig.from_kwargs(model=str(tmp_path / "no-such-model"), dtype="float32"))


def test_a_built_engine_shut_down_before_starting_stops_its_thread(tmp_path) -> None:
    from tests.entrypoints.in_process import tiny_config, write_tiny_model

    engine = AsyncLLMEngine.build(tiny_config(write_tiny_model(tmp_path)))
    engine.shutdown()
    assert not engine._thread.is_alive()
