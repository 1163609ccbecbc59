"""The journal's threads (store/connection.py, store/commands.py): the state cache shared by the
event loop and the writer thread keeps its rules while both use it at once, and a journal
whose commits run on the writer thread (`durability: full`) while the loop reads stays whole.

Races are made likely, not certain: the interpreter switches threads every microsecond here
(`sys.setswitchinterval`) instead of every 5 ms, and the cache is kept tiny so that every
write evicts. Without the cache's lock the first test fails within a few thousand rounds
(a stream marked verified with no state, or a KeyError from the LRU)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.domain import RecordSandboxStarted, RequestExec, RequestSession
from sandkasten.domain.session import SessionState, decide, evolve
from sandkasten.store.commands import StateCache
from sandkasten.store.journal import Journal

EXPIRES = datetime.now(timezone.utc) + timedelta(hours=1)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def fast_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def session_state(sid: str) -> SessionState:
    state = None
    for event in decide(None, RequestSession(image="busybox", expires_at=EXPIRES, session_id=sid), stream_id=sid):
        state = evolve(state, event)
    assert isinstance(state, SessionState)
    return state


def test_the_state_cache_keeps_its_rules_under_two_threads(fast_switching):
    cache = StateCache(size=8)
    states = {f"s-{i}": session_state(f"s-{i}") for i in range(32)}
    sids = list(states)
    failures: list[BaseException] = []
    rounds = 20_000

    def writer() -> None:   # what commits do on the writer thread
        try:
            for n in range(rounds):
                sid = sids[n % len(sids)]
                cache.commit({sid: replace(states[sid], version=n + 1)}, head=(n, "h"))
                if n % 7 == 0:
                    cache.forget(sids[(n * 3) % len(sids)])
                if n % 101 == 0:
                    cache.distrust()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def loop() -> None:     # what reads and plans do on the event loop
        try:
            for n in range(rounds):
                sid = sids[(n * 5) % len(sids)]
                cache.remember(sid, replace(states[sid], version=n))
                state, verified, _ = cache.trusted(sids[(n * 11) % len(sids)])
                assert state is not None or not verified, "a verified stream with no state"
                if n % 500 == 0:
                    cache.check()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    cache.check()


@pytest.mark.anyio
async def test_commits_on_the_writer_thread_and_reads_on_the_loop_leave_a_whole_journal(tmp_path, fast_switching):
    j = await Journal.open(tmp_path / "j.db", durability="full")   # every commit on the writer thread
    try:
        j._handler.cache.size = 4    # every commit and every read evicts
        sids = [f"s-{i}" for i in range(12)]
        for sid in sids:
            await j.execute(sid, RequestSession(image="busybox", expires_at=EXPIRES), actor="api")
            await j.execute(sid, RecordSandboxStarted(pid=4242, start_time=777), actor="reconciler")
        done = False

        async def write(sid: str) -> None:
            for k in range(8):
                await j.execute(sid, RequestExec(f"{sid}-{k}", "true", 1000), actor="api")

        async def read() -> None:
            while not done:
                for sid in sids:
                    state = await j.state(sid)
                    assert state is not None and state.version >= 2
                await asyncio.sleep(0)

        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(sid) for sid in sids))
        done = True
        await reader
        j._handler.cache.check()
        for sid in sids:
            state = await j.session_state(sid)
            assert state is not None and state.version == 2 + 8 and len(state.execs) == 8
            assert len(await j.execs(sid)) == 8
        assert (await j.verify()).ok
    finally:
        await j.close()
