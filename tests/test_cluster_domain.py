"""The cluster's pure parts: a host's life (epochs, heartbeats, lost), placement of sessions
(compare-and-set), fencing of sandbox observations, and choosing a host. No I/O."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.cluster.placement import Load, Need, NoHostAvailable, choose
from sandkasten.domain import RecordExecFinished, RecordSandboxStarted, RequestExec, RequestSession, decide, evolve
from sandkasten.domain import host as h
from sandkasten.errors import IllegalTransition, InvalidRequest

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
EXPIRES = NOW + timedelta(hours=1)


def run(state, stream, *commands):
    for command in commands:
        for event in decide(state, command, stream_id=stream):
            state = evolve(state, event)
    return state


def register(state, host_id="b", at=NOW):
    return run(state, h.host_stream(host_id), h.RegisterHost(host_id=host_id, address="http://127.0.0.1:1",
                                                             at=at.isoformat(), images=("base",)))


def test_every_registration_opens_a_new_epoch():
    s = register(None)
    assert (s.status, s.epoch, s.address, s.info["images"]) == ("live", 1, "http://127.0.0.1:1", ["base"])
    s = run(s, "host:b", h.RecordHeartbeat(epoch=1, at=(NOW + timedelta(seconds=2)).isoformat(), sessions=3))
    assert s.heartbeat_at == (NOW + timedelta(seconds=2)).isoformat()
    assert register(s).epoch == 2


def test_a_lost_host_is_fenced_until_it_registers_again():
    s = run(register(None), "host:b", h.DeclareHostLost(epoch=1, reason="no heartbeat for 9s", at=NOW.isoformat()))
    assert s.status == "lost"
    with pytest.raises(h.HostFenced, match="epoch 1"):
        decide(s, h.RecordHeartbeat(epoch=1, at=NOW.isoformat()), stream_id="host:b")
    with pytest.raises(IllegalTransition, match="lost"):  # declared once per epoch: one node wins
        decide(s, h.DeclareHostLost(epoch=1, reason="again", at=NOW.isoformat()), stream_id="host:b")
    s = register(s)
    assert (s.status, s.epoch) == ("live", 2)
    with pytest.raises(h.HostFenced):  # the old incarnation's heartbeat
        decide(s, h.RecordHeartbeat(epoch=1, at=NOW.isoformat()), stream_id="host:b")


def test_host_commands_only_on_host_streams():
    with pytest.raises(InvalidRequest):
        decide(None, h.RegisterHost(host_id="b", address="x", at=NOW.isoformat()), stream_id="s-1")
    with pytest.raises(IllegalTransition, match="stream is host:c"):
        decide(None, h.RegisterHost(host_id="b", address="x", at=NOW.isoformat()), stream_id="host:c")
    with pytest.raises(IllegalTransition, match="never registered"):
        decide(None, h.RecordHeartbeat(epoch=1, at=NOW.isoformat()), stream_id="host:b")


def session():
    return run(None, "s-1", RequestSession(image="base", expires_at=EXPIRES, session_id="s-1"))


def test_placement_is_compare_and_set():
    s = run(session(), "s-1", h.PlaceSession(host_id="b", epoch=1))
    assert (s.host_id, s.host_epoch) == ("b", 1)
    with pytest.raises(IllegalTransition, match="placed on b"):  # a second node placing it at once
        decide(s, h.PlaceSession(host_id="c", epoch=4), stream_id="s-1")
    s = run(s, "s-1", h.PlaceSession(host_id="c", epoch=4, expected=("b", 1), reason="recreate"))
    assert (s.host_id, s.host_epoch) == ("c", 4)


def test_observations_of_a_host_that_no_longer_owns_the_session_are_fenced():
    s = run(session(), "s-1", h.PlaceSession(host_id="b", epoch=1))
    started = RecordSandboxStarted(pid=10, start_time=20)
    assert h.fenced(s, started, ("b", 1)) is None
    assert "placed on host b (epoch 1), not on host b (epoch 2)" in h.fenced(s, started, ("b", 2))
    assert "not on host c" in h.fenced(s, started, ("c", 1))
    assert h.fenced(s, started, None) is None                      # one host: no fence
    assert h.fenced(s, RequestExec("e-1", "ls", 100), ("c", 1)) is None  # intents come from any node
    s = run(s, "s-1", started, RequestExec("e-1", "ls", 100))
    assert h.fenced(s, RecordExecFinished("e-1", 0), ("c", 1))


def host(hid, *, status="live", age=0.0, images=("base",), max_sessions=10, cpu=4.0, mem_mb=4096, epoch=1):
    return {"id": hid, "status": status, "epoch": epoch, "heartbeat_at": (NOW - timedelta(seconds=age)).isoformat(),
            "images": list(images), "max_sessions": max_sessions, "cpu": cpu, "mem_mb": mem_mb}


NEED = Need(image="base", cpu_limit=1.0, mem_limit_mb=512)


def test_choose_takes_the_least_loaded_live_host_with_room():
    hosts = [host("a"), host("b"), host("c")]
    assert choose(hosts, {}, NEED, now=NOW, timeout_s=10)["id"] == "a"  # ties: by id
    loads = {"a": Load(3, 1536), "b": Load(1, 512), "c": Load(2, 1024)}
    assert choose(hosts, loads, NEED, now=NOW, timeout_s=10)["id"] == "b"
    assert choose(hosts, loads, NEED, now=NOW, timeout_s=10, exclude=("b",))["id"] == "c"


def test_choose_respects_image_limits_and_liveness():
    hosts = [host("a", status="lost"), host("b", age=30), host("c", images=("python",)),
             host("d", max_sessions=1), host("e", mem_mb=256), host("f", cpu=0.5)]
    loads = {"d": Load(1, 100)}
    with pytest.raises(NoHostAvailable) as info:
        choose(hosts, loads, NEED, now=NOW, timeout_s=10)
    why = info.value.details["hosts"]
    assert why == {"a": "host is lost", "b": "no heartbeat for 30s", "c": "no image 'base'",
                   "d": "full (1/1 sessions)", "e": "not enough memory (256 MB left, 512 MB asked)",
                   "f": "too few CPUs (0.5 < 1)"}
    assert "unable to place a session with image 'base'" in info.value.message
    hosts.append(host("g"))
    assert choose(hosts, loads, NEED, now=NOW, timeout_s=10)["id"] == "g"
    with pytest.raises(NoHostAvailable, match="no host has registered"):
        choose([], {}, NEED, now=NOW, timeout_s=10)
