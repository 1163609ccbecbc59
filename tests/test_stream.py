"""Streaming exec output: `exec_feed` on real log files, then the SSE routes against a real daemon
(disconnects, resumes with Last-Event-ID, a daemon killed and restarted mid-exec).

Commands that must still be running when the test looks wait for a file the test writes
(`/workspace/go`) instead of sleeping, so no test depends on timing."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest

from runner.protocol import STDERR, STDOUT, frame
from sandkasten.files import exec_feed
from sandkasten.files.exec_feed import Cursor, FeedError, Frame, TextDecoder
from tests.test_api import assert_error, create

GATE = "while [ ! -e /workspace/go ]; do sleep 0.02; done"


# ------------------------------------------------------------------ exec_feed on real files
def test_cursor_round_trip_and_refusals():
    for c in (Cursor(0), Cursor(123), Cursor(7, b"\xc3", b""), Cursor(9, b"", b"\xe2\x82")):
        assert Cursor.parse(c.format()) == c
        assert Cursor.parse(c.format("-done")) == c
    assert Cursor.parse(None) == Cursor.parse("") == Cursor(0)
    for bad in ("abc", "-1", "1.2", "1.c.", "12;drop", "1.c3c3c3c3."):
        with pytest.raises(FeedError):
            Cursor.parse(bad)


def test_text_decoder_keeps_a_split_character_across_frames_and_cursors():
    ae = "ä".encode()
    first = Frame(10, "stdout", 0.0, b"a" + ae[:1])
    second = Frame(20, "stdout", 0.0, ae[1:] + b"b")
    d = TextDecoder()
    assert d.decode(first) == "a"
    cur = d.cursor(10)
    assert cur == Cursor(10, ae[:1], b"")
    assert d.decode(second) == "äb"
    resumed = TextDecoder(Cursor.parse(cur.format()))   # a client reconnecting with that id
    assert resumed.decode(second) == "äb"
    cut = TextDecoder()
    cut.decode(Frame(5, "stderr", 0.0, ae[:1]))
    assert cut.flush() == [("stderr", "\ufffd")]


def write_frames(path: Path, *frames: tuple[int, bytes]) -> list[int]:
    ends = []
    with open(path, "ab") as f:
        for stream, data in frames:
            f.write(frame(stream, data, 1.5))
            ends.append(f.tell())
    return ends


def test_follow_reads_frames_as_they_are_appended_and_stops_when_settled(tmp_path):
    path = tmp_path / "x-1.log"   # does not exist yet: the runner has not started the command
    done = asyncio.Event()

    async def scenario():
        got: list[Frame] = []

        async def consume():
            async for f in exec_feed.follow(path, 0, lambda: _is_set(done)):
                got.append(f)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        ends = write_frames(path, (STDOUT, b"one\n"))
        blob = frame(STDERR, b"two\n", 2.0)
        with open(path, "ab") as f:   # a frame written in two pieces is delivered whole
            f.write(blob[:7])
            f.flush()
            await asyncio.sleep(0.05)
            f.write(blob[7:])
        await asyncio.sleep(0.05)
        ends += write_frames(path, (STDOUT, b"three\n"))
        done.set()
        await asyncio.wait_for(task, 10)
        return got, ends

    got, ends = asyncio.run(scenario())
    assert [(f.stream, f.data) for f in got] == [("stdout", b"one\n"), ("stderr", b"two\n"), ("stdout", b"three\n")]
    assert got[0].offset == ends[0] and got[2].offset == ends[1] == path.stat().st_size
    assert got[1].ts == 2.0


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


def test_follow_yields_heartbeats_while_quiet(tmp_path):
    async def scenario():
        ticks = 0

        async def done() -> bool:
            return ticks >= 3

        async for f in exec_feed.follow(tmp_path / "x-3.log", 0, done, heartbeat_s=0.01):
            assert f is None
            ticks += 1
        return ticks

    assert asyncio.run(scenario()) == 3


def test_a_follower_sleeps_until_output_or_its_end_is_committed(tmp_path):
    """With inotify and the journal's commit listener (`endings`) a follower asks `is_done`
    only when something happened — not on a 5-20 ms timer — and its end arrives at once."""
    from sandkasten.domain import events as ev
    from sandkasten.control.endings import Endings
    from sandkasten.files.log_watch import LogWatch

    path = tmp_path / "x-9.log"
    path.write_bytes(frame(STDOUT, b"one", 1.0))
    asked, ended = [], []

    async def done() -> bool:
        asked.append(1)
        return bool(ended)

    async def run():
        watch, endings, wake = LogWatch(), Endings(), asyncio.Event()
        endings.subscribe("x-9", wake)
        loop = asyncio.get_running_loop()

        def write_then_end():
            with open(path, "ab") as f:
                f.write(frame(STDOUT, b"two", 2.0))
            loop.call_later(0.25, finish)

        def finish():
            ended.append(1)
            endings.committed([ev.RecordedEvent(seq=1, stream_id="s-1", stream_version=1, type=ev.EXEC_FINISHED,
                                                schema_version=1, payload={"exec_id": "x-9"}, actor="executor",
                                                request_id=None, created_at="", hash="")])

        loop.call_later(0.25, write_then_end)
        t0 = loop.time()
        try:
            got = [f.data async for f in exec_feed.follow(path, 0, done, watch=watch, wake=wake)]
        finally:
            watch.close()
        return got, loop.time() - t0

    got, took = asyncio.run(run())
    assert got == [b"one", b"two"]
    assert 0.45 < took < exec_feed.SETTLE_CHECK_S   # woken by the end, not by the fallback check
    assert len(asked) <= 4                         # a 5-20 ms poll would have asked ~30 times


def test_follow_resumes_at_an_offset_and_check_offset_refuses_non_boundaries(tmp_path):
    path = tmp_path / "x-2.log"
    ends = write_frames(path, (STDOUT, b"a" * 100), (STDERR, b"b"), (STDOUT, b"c" * 70000))

    async def collect(offset):
        return [f async for f in exec_feed.read_all(path, offset)]

    assert [f.data for f in asyncio.run(collect(ends[0]))] == [b"b", b"c" * 70000]
    assert asyncio.run(collect(ends[2])) == []
    for ok in (0, ends[0], ends[1], ends[2]):
        exec_feed.check_offset(path, ok)
    for bad in (3, ends[2] + 1):
        with pytest.raises(FeedError):
            exec_feed.check_offset(path, bad)
    with pytest.raises(FeedError):
        exec_feed.check_offset(tmp_path / "missing.log", 13)


# ------------------------------------------------------------------ SSE against a real daemon
def events(response: httpx.Response):
    """Parse an event stream from raw bytes (only LF separates lines here, as the server sends)."""
    buf = b""
    for piece in response.iter_bytes():
        buf += piece
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            fields = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "event" in fields:
                yield {"event": fields["event"], "id": fields.get("id"), "data": json.loads(fields["data"])}


def stream_exec(daemon, sid, cmd, headers=None, stop_after=None, **body):
    """POST …/exec/stream; read until done/error, or close the connection after `stop_after`
    chunk events. Returns the events seen."""
    seen = []
    with daemon.client.stream("POST", f"/v1/sessions/{sid}/exec/stream", json={"cmd": cmd, **body},
                              headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for e in events(r):
            seen.append(e)
            if stop_after is not None and sum(x["event"] == "chunk" for x in seen) >= stop_after:
                break
            if e["event"] in ("done", "error"):
                break
    return seen


def restream(daemon, sid, exec_id, last_id=None, raw=False, stop_after=None):
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    seen = []
    with daemon.client.stream("GET", f"/v1/sessions/{sid}/execs/{exec_id}/stream",
                              params={"raw_output": "true"} if raw else {}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for e in events(r):
            seen.append(e)
            if stop_after is not None and sum(x["event"] == "chunk" for x in seen) >= stop_after:
                break
            if e["event"] in ("done", "error"):
                break
    return seen


def chunks(seen, key="chunk", stream=None) -> str | bytes:
    parts = [e["data"] for e in seen if e["event"] == "chunk" and (stream is None or e["data"]["stream"] == stream)]
    if key == "chunk_base64":
        return b"".join(base64.b64decode(p["chunk_base64"]) for p in parts)
    return "".join(p["chunk"] for p in parts)


def last_id(seen) -> str:
    return seen[-1]["id"]


def go(daemon, sid) -> None:
    r = daemon.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "go", "text": ""})
    assert r.status_code == 200, r.text


def exists(daemon, sid, path) -> bool:
    return daemon.client.get(f"/v1/sessions/{sid}/fs/read", params={"path": path}).status_code == 200


def test_chunks_arrive_while_the_command_runs_then_done(daemon):
    sid = create(daemon)["id"]
    cmd = f"cd /tmp; echo first; echo oops >&2; {GATE}; echo second; (exit 3)"
    seen = []
    with daemon.client.stream("POST", f"/v1/sessions/{sid}/exec/stream", json={"cmd": cmd}) as r:
        assert r.status_code == 200
        exec_id = r.headers["x-exec-id"]
        it = events(r)
        while not any(e["event"] == "chunk" and e["data"]["stream"] == "stderr" for e in seen):
            seen.append(next(it))
        row = daemon.client.get(f"/v1/sessions/{sid}/execs/{exec_id}").json()
        # the output came before the command ended (exec.started may trail by STARTED_DELAY)
        assert row["status"] in ("requested", "running") and row["exit_code"] is None
        go(daemon, sid)
        for e in it:
            seen.append(e)
            if e["event"] == "done":
                break
    assert seen[0]["event"] == "started" and seen[0]["data"]["exec_id"] == exec_id
    assert chunks(seen, stream="stdout") == "first\nsecond\n"
    assert chunks(seen, stream="stderr") == "oops\n"
    assert all(isinstance(e["data"]["timestamp"], float) for e in seen if e["event"] == "chunk")
    done = seen[-1]
    assert done["event"] == "done" and done["id"].endswith("-done")
    assert done["data"]["exit_code"] == 3 and done["data"]["cwd"] == "/tmp"
    assert done["data"]["timed_out"] is False and done["data"]["truncated"] is False
    offsets = [int(e["id"].split(".")[0]) for e in seen if e["event"] == "chunk"]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    # the ordinary exec API agrees, and the session keeps its state
    assert daemon.client.get(f"/v1/sessions/{sid}").json()["cwd"] == "/tmp"


def test_disconnect_does_not_kill_the_command_and_resume_misses_nothing(daemon):
    sid = create(daemon)["id"]
    cmd = f"echo a; echo b >&2; {GATE}; for i in 1 2 3; do echo line$i; done; touch /workspace/finished"
    first = stream_exec(daemon, sid, cmd, stop_after=1, raw_output=True)
    exec_id = first[0]["data"]["exec_id"]
    go(daemon, sid)   # the client is gone; the command goes on
    rest = restream(daemon, sid, exec_id, last_id=last_id(first), raw=True)
    assert rest[0]["event"] == "started" and rest[-1]["event"] == "done"
    whole = first + rest
    assert chunks(whole, stream="stdout") == "a\nline1\nline2\nline3\n"
    assert chunks(whole, stream="stderr") == "b\n"
    assert chunks(whole, "chunk_base64") == b"a\nb\nline1\nline2\nline3\n" or \
        chunks(whole, "chunk_base64") == b"b\na\nline1\nline2\nline3\n"
    assert exists(daemon, sid, "finished")
    # the same bytes as the stored output, in order
    stored = daemon.client.get(f"/v1/sessions/{sid}/execs/{exec_id}").json()
    assert chunks(whole) == stored["output"]


def test_large_output_resumes_byte_exact(daemon):
    sid = create(daemon)["id"]
    first = stream_exec(daemon, sid, "seq 1 300000; echo end >&2", stop_after=1, raw_output=True)
    exec_id = first[0]["data"]["exec_id"]
    rest = restream(daemon, sid, exec_id, last_id=last_id(first), raw=True)
    expected = "".join(f"{i}\n" for i in range(1, 300001))
    assert len(expected) > 1_000_000
    whole = first + rest
    assert chunks(whole, stream="stdout") == expected
    out = b"".join(base64.b64decode(e["data"]["chunk_base64"]) for e in whole
                   if e["event"] == "chunk" and e["data"]["stream"] == "stdout")
    assert out == expected.encode()
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["exit_code"] == 0


def test_multibyte_output_split_across_frames_and_a_resume(daemon):
    sid = create(daemon)["id"]
    # 'a' and the first byte of 'ä' arrive, then the command waits: the resume point is inside a character
    cmd = f"printf 'a\\303'; {GATE}; printf '\\244b\\n'; yes ä | head -n 100000"
    first = stream_exec(daemon, sid, cmd, stop_after=1, raw_output=True)
    exec_id = first[0]["data"]["exec_id"]
    assert chunks(first) == "a" and base64.b64decode(first[-1]["data"]["chunk_base64"]) == b"a\xc3"
    go(daemon, sid)
    rest = restream(daemon, sid, exec_id, last_id=last_id(first), raw=True)
    expected = "aäb\n" + "ä\n" * 100000
    whole = first + rest
    assert chunks(whole) == expected and "\ufffd" not in chunks(whole)
    assert chunks(whole, "chunk_base64") == expected.encode()
    # a resume from every third chunk id of the finished exec gives the same text from there on
    full = restream(daemon, sid, exec_id)
    marks = [i for i, e in enumerate(full) if e["event"] == "chunk"][::3]
    for i in marks[:5]:
        tail = restream(daemon, sid, exec_id, last_id=full[i]["id"])
        assert chunks(full[:i + 1]) + chunks(tail) == expected


def test_resume_a_finished_exec_from_the_start_middle_and_end(daemon):
    sid = create(daemon)["id"]
    seen = stream_exec(daemon, sid, "for i in 1 2 3; do echo $i; done; echo e >&2")
    exec_id = seen[0]["data"]["exec_id"]
    assert seen[-1]["event"] == "done"
    again = restream(daemon, sid, exec_id)
    assert chunks(again) == chunks(seen) and again[-1]["data"] == seen[-1]["data"]
    middle = next(i for i, e in enumerate(seen) if e["event"] == "chunk")
    tail = restream(daemon, sid, exec_id, last_id=seen[middle]["id"])
    assert chunks(seen[:middle + 1]) + chunks(tail) == chunks(seen)
    end = restream(daemon, sid, exec_id, last_id=seen[-1]["id"])   # after done: just done again
    assert [e["event"] for e in end] == ["started", "done"]
    by_query = daemon.client.get(f"/v1/sessions/{sid}/execs/{exec_id}/stream",
                                 params={"last_event_id": seen[-1]["id"]})
    assert "event: done" in by_query.text


def test_resume_across_a_daemon_restart(daemon):
    sid = create(daemon)["id"]
    first = stream_exec(daemon, sid, f"echo one; {GATE}; echo two; touch /workspace/finished", stop_after=1)
    exec_id = first[0]["data"]["exec_id"]
    daemon.kill()
    daemon.start()
    go(daemon, sid)
    rest = restream(daemon, sid, exec_id, last_id=last_id(first))
    assert chunks(first + rest) == "one\ntwo\n"
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["exit_code"] == 0
    assert exists(daemon, sid, "finished")


def test_a_destroyed_session_ends_the_stream_with_an_error(daemon):
    sid = create(daemon)["id"]
    with daemon.client.stream("POST", f"/v1/sessions/{sid}/exec/stream", json={"cmd": f"echo x; {GATE}"}) as r:
        it = events(r)
        assert next(it)["event"] == "started"
        assert next(it)["event"] == "chunk"
        assert daemon.client.delete(f"/v1/sessions/{sid}").json() == {"ok": True}
        tail = list(it)
    end = tail[-1]   # cut short by the DELETE: the session ended, no sandbox was "lost"
    assert end["event"] == "error" and end["data"]["error_code"] == "SESSION_ENDED", end
    assert "destroyed while it ran" in end["data"]["message"] and "runner.sock" not in end["data"]["message"]


def test_idempotency_key_attaches_to_the_same_exec_and_resumes(daemon):
    sid = create(daemon)["id"]
    key = {"Idempotency-Key": "stream-once-1"}
    cmd = "echo once >> /workspace/count; cat /workspace/count; echo err >&2"
    a = stream_exec(daemon, sid, cmd, headers={**key, "Last-Event-ID": "12345"})   # new exec: all of it
    b = stream_exec(daemon, sid, cmd, headers=key)
    assert a[0]["data"]["exec_id"] == b[0]["data"]["exec_id"]
    assert chunks(a) == chunks(b) and sorted(chunks(a).split()) == ["err", "once"]
    first = next(e for e in a if e["event"] == "chunk")
    resumed = stream_exec(daemon, sid, cmd, headers={**key, "Last-Event-ID": first["id"]})
    assert first["data"]["chunk"] + chunks(resumed) == chunks(a)
    assert len(daemon.client.get(f"/v1/sessions/{sid}/execs").json()) == 1


def test_stream_refusals_are_json_errors(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    assert_error(c.post(f"/v1/sessions/{sid}/exec/stream", json={"cmd": ""}), 400, "INVALID_REQUEST")
    assert_error(c.post(f"/v1/sessions/{sid}/exec/stream", json={"cmd": "true", "nope": 1}), 400, "INVALID_REQUEST")
    assert_error(c.post(f"/v1/sessions/{sid}/exec/stream", json={"cmd": "true"}, headers={"Last-Event-ID": "x"}),
                 400, "INVALID_REQUEST")
    assert c.get(f"/v1/sessions/{sid}/execs").json() == []   # nothing refused was journaled
    assert_error(c.post("/v1/sessions/s-000000000000/exec/stream", json={"cmd": "true"}), 404, "SESSION_NOT_FOUND")
    assert_error(c.get(f"/v1/sessions/{sid}/execs/x-nope/stream"), 404, "EXEC_NOT_FOUND")
    seen = stream_exec(daemon, sid, "echo hi")
    exec_id = seen[0]["data"]["exec_id"]
    for bad in ("banana", "999999", "3"):
        assert_error(c.get(f"/v1/sessions/{sid}/execs/{exec_id}/stream", headers={"Last-Event-ID": bad}),
                     400, "INVALID_REQUEST")
    c.delete(f"/v1/sessions/{sid}")
    assert_error(c.post(f"/v1/sessions/{sid}/exec/stream", json={"cmd": "true"}), 410, "SESSION_ENDED")
    assert "event: done" in c.get(f"/v1/sessions/{sid}/execs/{exec_id}/stream").text   # history stays readable
