"""Sessions keep a conversation's KV between calls: the next call computes only its new tokens,
with the same greedy tokens as a fresh run; holds give way to live requests (oldest first), expire,
are deleted on demand (memory back to baseline), and belong to their owner alone."""

from __future__ import annotations

import time

import pytest

from kvos import LLM
from kvos.engine.llm_engine import LLMEngine
from kvos.engine.sessions import SessionRef
from kvos.errors import InvalidRequestError, SessionNotFoundError
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams

TINY_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
BLOCK = 4
POOL_TOKENS = 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.model.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(str(tmp_path_factory.mktemp("sessions")), "llama")


def make_llm(folder: str, **options: object) -> LLM:
    defaults: dict[str, object] = dict(block_size=BLOCK, kv_cache_memory_bytes=POOL_TOKENS * TINY_BYTES_PER_TOKEN)
    return LLM(folder, **{**defaults, **options}, dtype="float32")


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run(engine: LLMEngine, req_id: str, ids: list[int], session: SessionRef | None = None) -> RequestOutput:
    engine.add_request(req_id, ids, greedy(), session=session)
    while True:
        for out in engine.step():
            if out.req_id == req_id and out.finished:
                return out


def ids(n: int, start: int) -> list[int]:
    return [100 + (start + 7 * i) % 5000 for i in range(n)]


def test_next_call_reuses_the_held_turn_and_matches_a_fresh_run(folder: str) -> None:
    llm = make_llm(folder)
    engine = llm.engine
    turn1 = ids(30, 1)
    out1 = run(engine, "t1", turn1, SessionRef("chat-1"))
    history = turn1 + out1.outputs[0].token_ids
    # Other prompts fill the pool: without the hold, turn 1's blocks would be evicted.
    for i in range(3):
        run(engine, f"filler-{i}", ids(60, 1000 * (i + 1)))
    turn2 = history + ids(9, 77)
    out2 = run(engine, "t2", turn2, SessionRef("chat-1"))
    computed_turn1 = len(history) - 1  # the last sampled token has no KV yet
    assert out2.num_cached_tokens == computed_turn1 // BLOCK * BLOCK
    with make_llm(folder) as fresh:
        (reference,) = fresh.generate([turn2], greedy(), use_tqdm=False)
    assert out2.outputs[0].token_ids == reference.outputs[0].token_ids
    assert reference.num_cached_tokens == 0
    (info,) = engine.list_sessions()
    assert (info.session_id, info.num_calls, info.num_tokens) == ("chat-1", 2, len(turn2) + 6)
    engine.delete_session("chat-1")
    assert engine.kv_manager.num_used_blocks == 0
    assert engine.list_sessions() == []


def test_without_a_session_the_turn_is_evicted(folder: str) -> None:
    """The control for the test above: the same traffic without a session finds (almost) nothing."""
    engine = make_llm(folder).engine
    turn1 = ids(30, 1)
    out1 = run(engine, "t1", turn1)
    for i in range(3):
        run(engine, f"filler-{i}", ids(60, 1000 * (i + 1)))
    out2 = run(engine, "t2", turn1 + out1.outputs[0].token_ids + ids(9, 77))
    assert out2.num_cached_tokens < 8


def test_holds_give_way_to_live_requests_oldest_first(folder: str) -> None:
    engine = make_llm(folder).engine
    for i in range(4):  # 4 sessions x 5 blocks: most of the 32-block pool
        run(engine, f"s{i}", ids(17, 100 * i), SessionRef(f"agent-{i}"))
    kv = engine.kv_manager
    held_before = kv.num_held_blocks
    assert held_before == 20
    big = run(engine, "big", ids(70, 9999))
    assert big.outputs[0].finish_reason == "length"
    assert engine.scheduler.num_preemptions == 0
    assert engine.scheduler.num_hold_releases >= 1
    released = 4 - len(kv.held_keys())
    assert released >= 1
    # The newest sessions kept their holds; the oldest lost theirs.
    newest_keys = [engine.sessions._sessions[f"agent-{i}"].hold_key for i in range(released, 4)]
    assert kv.held_keys() == newest_keys
    for i in range(4):
        engine.delete_session(f"agent-{i}")
    assert kv.num_used_blocks == 0


def test_sessions_expire_after_the_ttl(folder: str) -> None:
    engine = make_llm(folder, session_ttl=0.2).engine
    run(engine, "t1", ids(20, 3), SessionRef("short"))
    assert engine.kv_manager.num_used_blocks > 0
    time.sleep(0.3)
    assert engine.list_sessions() == []
    assert engine.kv_manager.num_used_blocks == 0


def test_a_session_is_its_owners_alone(folder: str) -> None:
    engine = make_llm(folder).engine
    run(engine, "t1", ids(20, 3), SessionRef("mine", owner="key-a"))
    with pytest.raises(SessionNotFoundError):
        engine.add_request("t2", ids(24, 3), greedy(), session=SessionRef("mine", owner="key-b"))
    assert not engine.has_unfinished_requests()
    assert engine.list_sessions("key-b") == []
    with pytest.raises(SessionNotFoundError):
        engine.delete_session("mine", "key-b")
    assert [s.session_id for s in engine.list_sessions("key-a")] == ["mine"]
    engine.delete_session("mine", "key-a")
    assert engine.kv_manager.num_used_blocks == 0


def test_deleting_a_session_mid_call_frees_its_kv_when_the_call_ends(folder: str) -> None:
    engine = make_llm(folder).engine
    engine.add_request("t1", ids(20, 3), greedy(), session=SessionRef("busy"))
    engine.step()
    engine.delete_session("busy")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.num_used_blocks == 0
    assert engine.list_sessions() == []


@pytest.mark.parametrize(
    ("session_id", "words"),
    [("", "1 to 128"), ("x" * 129, "1 to 128"), ("a b", "letters, digits"), ("ü", "letters, digits")],
)
def test_bad_session_ids_are_refused(folder: str, session_id: str, words: str) -> None:
    engine = make_llm(folder).engine
    with pytest.raises(InvalidRequestError, match=words) as info:
        engine.add_request("t", ids(8, 1), greedy(), session=SessionRef(session_id))
    assert info.value.param == "session_id"
    assert engine.list_sessions() == [] and not engine.has_unfinished_requests()


def test_sessions_need_one_sequence_and_the_paged_prefix_cache(folder: str) -> None:
    engine = make_llm(folder).engine
    with pytest.raises(InvalidRequestError, match="n = 1"):
        engine.add_request("t", ids(8, 1), SamplingParams(n=2, max_tokens=2), session=SessionRef("s"))
    no_prefix = make_llm(folder, enable_prefix_caching=False).engine
    with pytest.raises(InvalidRequestError, match="prefix caching") as info:
        no_prefix.add_request("t", ids(8, 1), greedy(), session=SessionRef("s"))
    assert info.value.param == "session_id"
    assert engine.list_sessions() == []


def test_sessions_with_the_core_in_its_own_process(folder: str) -> None:
    """The hold key travels in the Request and the release as one message down the core's pipe."""
    with make_llm(folder, core_process=True) as llm:
        engine = llm.engine
        turn1 = ids(30, 1)
        out1 = run(engine, "t1", turn1, SessionRef("remote"))
        out2 = run(engine, "t2", turn1 + out1.outputs[0].token_ids + ids(9, 77), SessionRef("remote"))
        assert out2.num_cached_tokens == (len(turn1) + 6 - 1) // BLOCK * BLOCK
        engine.delete_session("remote")
        run(engine, "after", ids(5, 3))  # its step brings the core's stats, taken after the release
        assert engine.stats().num_used_blocks == 0
