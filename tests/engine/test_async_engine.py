"""AsyncEngine: the step loop on its own thread, streaming to asyncio consumers."""

from __future__ import annotations

import asyncio
import time

import pytest

from frugal import LLM, SamplingParams
from frugal.engine.async_engine import AsyncEngine, EngineError, EngineStoppedError, GenerateRequest
from frugal.errors import InvalidRequestError

KWARGS = dict(dtype="float32", kv_cache_memory="8MiB", max_num_seqs=16)
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom", [1, 403, 407]]


@pytest.fixture(scope="module")
def offline(stories260k):
    return LLM(str(stories260k), **KWARGS)


@pytest.fixture
def engine(stories260k):
    engine = AsyncEngine(LLM(str(stories260k), **KWARGS).engine)
    yield engine
    engine.shutdown()


async def collect(engine, request_id, prompt, params):
    text, token_ids, finish = [], [], None
    async for delta in engine.generate(request_id, prompt, params):
        text.append(delta.text)
        token_ids.extend(delta.token_ids)
        finish = delta.finish_reason or finish
    return "".join(text), token_ids, finish


def run(coro, timeout_s=60):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def test_concurrent_requests_equal_offline_generate(engine, offline):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    expected = offline.generate(PROMPTS, params)

    async def main():
        return await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(PROMPTS)))

    for (text, token_ids, finish), want in zip(run(main()), expected):
        assert (text, token_ids, finish) == (want.outputs[0].text, want.outputs[0].token_ids,
                                             want.outputs[0].finish_reason)
    assert engine.snapshot().num_used_blocks == 0


def test_n_samples_and_several_requests_share_one_stream(engine, offline):
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=9)
    expected = offline.generate(["Once upon a time", "The little dog"], params)

    async def main():
        stream = await engine.add_requests([GenerateRequest("a", "Once upon a time", params),
                                            GenerateRequest("b", "The little dog", params)])
        got = {}
        async for delta in stream:
            got.setdefault((delta.request_id, delta.index), []).extend(delta.token_ids)
        return stream, got

    stream, got = run(main())
    assert stream.finished and stream.num_sequences == 6
    for rid, want in zip("ab", expected):
        assert [got[rid, i] for i in range(3)] == [o.token_ids for o in want.outputs]


def test_bad_request_is_rejected_atomically(engine):
    params = SamplingParams(max_tokens=4)

    async def main():
        with pytest.raises(InvalidRequestError, match="prompt token id"):
            await engine.add_requests([GenerateRequest("ok", "Once", params),
                                       GenerateRequest("bad", [1, 10**6], params)])
        with pytest.raises(InvalidRequestError, match="max_model_len"):
            await engine.add_requests([GenerateRequest("long", [1] * 600, params)])
        return await collect(engine, "after", "Once", params)

    text, token_ids, _ = run(main())
    assert len(token_ids) == 4
    snap = engine.snapshot()
    assert snap.num_unfinished_sequences == 0 and snap.num_waiting == 0 and snap.num_used_blocks == 0


def test_abort_frees_blocks_before_the_next_step(engine):
    params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        stream = await engine.add_requests([GenerateRequest(f"x{i}", "Once upon a time", params) for i in range(4)])
        seen = 0
        async for delta in stream:
            seen += len(delta.token_ids)
            if seen >= 8:
                break
        held = engine.snapshot()
        steps = held.num_steps
        stream.abort()
        deadline = time.monotonic() + 10
        while engine.snapshot().num_used_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return held, steps

    held, steps = run(main())
    snap = engine.snapshot()
    assert held.num_used_blocks > 0 and held.num_running == 4
    assert snap.num_used_blocks == 0 and snap.num_running == 0 and snap.num_unfinished_sequences == 0
    # At most the step that was running when the abort arrived, plus one, ran after it.
    assert snap.num_steps - steps <= 2


def test_loop_sleeps_when_idle_and_wakes_on_a_request(engine):
    run(collect(engine, "warm", "Once", SamplingParams(max_tokens=2)))
    steps = engine.snapshot().num_steps
    time.sleep(0.3)
    assert engine.snapshot().num_steps == steps  # no busy stepping while idle
    _, token_ids, _ = run(collect(engine, "wake", "Once", SamplingParams(max_tokens=3)))
    assert len(token_ids) == 3 and engine.snapshot().num_steps > steps


def test_a_failing_step_fails_in_flight_requests_and_the_loop_goes_on(engine, monkeypatch):
    # Fault injection: the runner raises on the first step that samples for request "bad".
    runner = engine.engine.runner
    real_execute = runner.execute

    def execute(scheduler_output):
        if any(s.request_id == "bad" for s in scheduler_output.scheduled):
            raise RuntimeError("injected runner failure")
        return real_execute(scheduler_output)

    monkeypatch.setattr(runner, "execute", execute)

    async def main():
        with pytest.raises(EngineError, match="engine failed"):
            await collect(engine, "bad", "Once", SamplingParams(temperature=1.0, max_tokens=4))
        return await collect(engine, "good", "Once upon a time", SamplingParams(temperature=0.0, max_tokens=5))

    _, token_ids, finish = run(main())
    assert len(token_ids) == 5 and finish == "length"
    assert engine.is_running and engine.snapshot().num_used_blocks == 0


def test_out_of_range_seed_is_rejected_up_front():
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=2**64)


def test_shutdown_ends_streams_and_refuses_new_requests(engine):
    async def main():
        stream = await engine.add_requests([GenerateRequest("long", "Once", SamplingParams(max_tokens=400,
                                                                                           ignore_eos=True))])
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError):
            await engine.add_requests([GenerateRequest("late", "Once", SamplingParams(max_tokens=2))])

    run(main())
    assert not engine.is_running and engine.snapshot().num_used_blocks == 0
