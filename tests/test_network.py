"""Bridge networking on the real kernel: veth + bridge, nft egress allow-list, teardown.

Safety: these tests only ever talk to hosts they created — a network namespace `sk-test-<pid>`
("outside") reached through a test-only veth in 198.18.<n>.0/28, the test bridge's own
gateway address — and to loopback. The bridge, its subnet and its nft tables are test-only
(named after this pid) and removed at the end, also on failure.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandkasten import config as config_mod
from sandkasten.errors import ConfigError, InvalidRequest
from sandkasten.runtime import network
from sandkasten.runtime.sandboxes import Runtime
from sandkasten.runtime.spec import ExecRequest

PID = os.getpid()
SETTINGS = network.Settings(bridge=f"skt{PID % 100000}", subnet=f"10.{200 + PID % 50}.{PID // 50 % 256}.0/24")
NETNS = f"sk-test-{PID}"
OUTSIDE_VETH = f"skto{PID % 100000}"
OUTSIDE = ipaddress.IPv4Network(f"198.18.{PID % 256}.0/28")
HOST_END, ALLOWED, DENIED = (str(OUTSIDE.network_address + i) for i in (1, 2, 3))
PORT = 8000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
_ids = itertools.count()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def run(rt, sid, cmd, timeout_ms=20_000):
    eid = f"n{next(_ids)}"
    res = rt.exec(sid, ExecRequest(eid, cmd, timeout_ms=timeout_ms))
    out, err, _, _ = rt.read_output(sid, eid)
    return res.exit_code, out.decode(), err.decode()


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A host outside the sandboxes: a netns with two addresses (one we allow, one we don't)
    and an HTTP server, routed via a test veth whose host end forwards (only that interface)."""
    root = tmp_path_factory.mktemp("outside")
    (root / "hello.txt").write_text("hello from outside\n")
    server = None
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", OUTSIDE_VETH, "type", "veth", "peer", "name", "eth0", "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_END}/{OUTSIDE.prefixlen}", "dev", OUTSIDE_VETH)
        sh("ip", "link", "set", OUTSIDE_VETH, "up")
        Path(f"/proc/sys/net/ipv4/conf/{OUTSIDE_VETH}/forwarding").write_text("1")
        for addr in (ALLOWED, DENIED):
            sh("ip", "-n", NETNS, "addr", "add", f"{addr}/{OUTSIDE.prefixlen}", "dev", "eth0")
        sh("ip", "-n", NETNS, "link", "set", "eth0", "up")
        sh("ip", "-n", NETNS, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-m", "http.server",
                                   str(PORT), "--bind", "0.0.0.0", "--directory", str(root)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:  # the host reaches its own test netns directly (no bridge, no filter)
            try:
                socket.create_connection((ALLOWED, PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("test HTTP server in the outside netns did not start")
                time.sleep(0.05)
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        sh("ip", "link", "del", OUTSIDE_VETH, check=False)
        sh("ip", "netns", "del", NETNS, check=False)
        network.remove_host(SETTINGS)


@pytest.fixture
def netrt(data_dir, cgroup_parent, outside):
    rt = Runtime.detect(data_dir, cgroup_parent=cgroup_parent, network=SETTINGS)
    yield rt
    try:
        rt.remove_all()
    finally:
        rt.close()


def bridged(rt, sid, allow=(), **opts):
    rt.create(rt.spec(sid, "base", network_mode="bridge", egress_allow=tuple(allow), **opts))
    return sid


def address_of(rt, sid) -> str:
    code, out, _ = run(rt, sid, "ip -4 -o addr show dev eth0")
    assert code == 0, out
    return out.split()[3].split("/")[0]


def fetch(rt, sid, host) -> tuple[int, str]:
    """HTTP GET with busybox nc (its static wget crashes in NSS), 2 s connect timeout."""
    code, out, _ = run(rt, sid, f"printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} {PORT}")
    return code, out.rpartition("\r\n\r\n")[2]


# ---------------------------------------------------------------- allow-list parsing (no kernel)

def test_egress_entries_normalised_and_bounded():
    s = network.Settings(subnet="10.213.0.0/16")
    assert network.egress_entries(["198.18.0.0/15", "192.0.2.7", "192.0.2.7/32"], s) == \
        ("198.18.0.0/15", "192.0.2.7/32")
    cases = {
        "10.0.0.1/8": "host bits", "::1": "IPv6", "127.0.0.1": "loopback", "169.254.1.1": "link-local",
        "224.0.0.1": "multicast", "10.213.4.0/24": "bridge subnet", "0.0.0.0/0": "overlaps",
        "not a host!": "neither", "localhost": "loopback",  # names resolve (here: /etc/hosts) first
    }
    for entry, why in cases.items():
        with pytest.raises(InvalidRequest, match=why):
            network.egress_entries([entry], s)
    with pytest.raises(InvalidRequest, match="outside the allowed range"):
        network.egress_entries(["192.0.2.0/24"], s, within=["198.18.0.0/15"])
    with pytest.raises(InvalidRequest, match="at most"):
        network.egress_entries([f"192.0.2.{i}" for i in range(40)], s)
    with pytest.raises(InvalidRequest, match="a list"):
        network.egress_entries("192.0.2.1", s)


def test_network_config_validated(tmp_path):
    cfg = config_mod.from_mapping({"network": {"bridge": "br-x", "subnet": "10.99.0.0/24",
                                               "egress_allow": ["192.0.2.0/24"], "dns": ["192.0.2.53"]}})
    assert cfg.network.bridge == "br-x" and cfg.network.egress_allow == ("192.0.2.0/24",)
    for bad, key in (({"colour": 1}, "network.colour"), ({"bridge": "x" * 16}, "network.bridge"),
                     ({"bridge": "sk-abc"}, "network.bridge"), ({"subnet": "8.8.0.0/16"}, "network.subnet"),
                     ({"subnet": "10.0.0.0/30"}, "network.subnet"), ({"dns": ["nope"]}, "network.dns"),
                     ({"egress_allow": ["10.0.0.1/8"]}, "network.egress_allow"),
                     ({"session_egress_within": ["::/0"]}, "network.session_egress_within")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_mod.from_mapping({"network": bad})
    env = config_mod.load(None, env={"SANDKASTEN_NETWORK__BRIDGE": "br-env"})
    assert env.network.bridge == "br-env"


# ---------------------------------------------------------------- real sandboxes

def test_none_mode_has_only_loopback(netrt):
    netrt.create(netrt.spec("s-net-none", "base"))
    code, out, _ = run(netrt, "s-net-none", "ip -o link | cut -d: -f2")
    assert out.split() == ["lo"]
    assert not network.has_veth("s-net-none")
    assert not netrt.paths("s-net-none").network_marker.exists()


def test_bridge_reaches_allowed_host_only(netrt):
    sid = bridged(netrt, "s-net-allow", allow=[f"{ALLOWED}/32"])
    addr = address_of(netrt, sid)
    assert ipaddress.IPv4Address(addr) in SETTINGS.network and addr != SETTINGS.gateway
    code, out, _ = run(netrt, sid, "ip route; ip -o link | cut -d: -f2")
    assert f"default via {SETTINGS.gateway}" in out and [n.split("@")[0] for n in out.split()[-2:]] == ["lo", "eth0"]
    assert fetch(netrt, sid, ALLOWED) == (0, "hello from outside\n")
    code, _ = fetch(netrt, sid, DENIED)  # same host, other address: not on the list
    assert code != 0


def test_bridge_denies_by_default(netrt):
    sid = bridged(netrt, "s-net-deny")
    assert fetch(netrt, sid, ALLOWED)[0] != 0
    code, out, _ = run(netrt, sid, "nc -w 2 " + ALLOWED + f" {PORT} </dev/null; echo rc=$?")
    assert "rc=0" not in out


def test_bridge_cannot_reach_host_or_other_sandboxes(netrt):
    # Even a sandbox allowed "everything" (config-level 0.0.0.0/0) reaches neither the host's
    # own addresses nor another sandbox.
    victim = bridged(netrt, "s-net-victim")
    run(netrt, victim, "nc -l -p 9000 >/tmp/got </dev/null & echo started")
    assert run(netrt, victim, "sleep 0.2; netstat -ltn | grep -c :9000")[1].strip() == "1"
    target = address_of(netrt, victim)
    attacker = bridged(netrt, "s-net-attacker", allow=["0.0.0.0/0"])
    listeners = []
    try:
        for host in (SETTINGS.gateway, HOST_END):  # addresses this test owns on the host
            s = socket.socket()
            s.bind((host, 0))
            s.listen()
            listeners.append(s)
            code, out, _ = run(netrt, attacker, f"nc -w 2 {host} {s.getsockname()[1]} </dev/null; echo rc=$?")
            assert "rc=0" not in out, f"sandbox reached host address {host}"
        code, out, _ = run(netrt, attacker, f"echo hi | nc -w 2 {target} 9000; echo rc=$?")
        assert "rc=0" not in out, "sandbox reached another sandbox"
        assert fetch(netrt, attacker, ALLOWED)[0] == 0  # while the way out works
    finally:
        for s in listeners:
            s.close()


def test_teardown_removes_veth_and_rules_idempotently(netrt):
    sid = bridged(netrt, "s-net-gone", allow=[f"{ALLOWED}/32"])
    veth = network.veth_name(sid)
    assert len(veth) <= 15 and network.has_veth(sid)
    assert sid in network.leftover_sessions(netrt.layout.data_dir)
    assert sid in netrt.host_sessions()
    ruleset = sh("nft", "list", "table", "inet", SETTINGS.table).stdout
    assert f"sb-{sid}" in ruleset
    netrt.destroy(sid)
    netrt.destroy(sid)
    assert not network.has_veth(sid)
    assert sid not in netrt.host_sessions()
    assert f"sb-{sid}" not in sh("nft", "list", "table", "inet", SETTINGS.table).stdout
    assert veth not in sh("nft", "list", "table", "bridge", SETTINGS.table).stdout


def test_orphan_found_by_veth_and_removed(netrt, data_dir, cgroup_parent):
    # Another process's runtime, built without this network config (default settings, as
    # `sandkasten doctor` or a restarted daemon might be), finds the veth by its alias and
    # removes veth and rules via the marker the spawner wrote.
    sid = bridged(netrt, "s-net-orphan")
    other = Runtime.detect(data_dir, cgroup_parent=cgroup_parent)  # default network settings
    try:
        assert sid in other.host_sessions()
        other.destroy(sid)
    finally:
        other.close()
    assert not network.has_veth(sid)
    assert f"sb-{sid}" not in sh("nft", "list", "table", "inet", SETTINGS.table).stdout


def test_many_sandboxes_get_distinct_addresses(netrt):
    sids = [bridged(netrt, f"s-net-many{i}") for i in range(5)]
    addrs = {address_of(netrt, sid) for sid in sids}
    assert len(addrs) == 5


# ---------------------------------------------------------------- over HTTP, real daemon

def test_daemon_bridge_session_over_http(daemon_factory, outside):
    d = daemon_factory(network={"bridge": SETTINGS.bridge, "subnet": SETTINGS.subnet,
                                "session_egress_within": [str(OUTSIDE)]}).start()
    http = d.client
    for body, why in (({"network_mode": "bridge", "egress_allow": ["192.0.2.0/24"]}, "outside the allowed range"),
                      ({"network_mode": "none", "egress_allow": [f"{ALLOWED}/32"]}, "only network_mode"),
                      ({"network_mode": "bridge", "egress_allow": ["localhost"]}, "loopback"),
                      ({"network_mode": "bridge", "egress_allow": "10.0.0.0/8"}, "a list")):
        r = http.post("/v1/sessions", json=body)
        assert r.status_code == 400 and r.json()["error_code"] == "INVALID_REQUEST", r.text
        assert why in r.json()["message"]
    r = http.post("/v1/sessions", json={"network_mode": "bridge", "egress_allow": [ALLOWED]})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    get = f"printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {{}} {PORT}"
    r = http.post(f"/v1/sessions/{sid}/exec", json={"cmd": get.format(ALLOWED)})
    assert r.status_code == 200 and r.json()["exit_code"] == 0 and "hello from outside" in r.json()["stdout"], r.text
    r = http.post(f"/v1/sessions/{sid}/exec", json={"cmd": get.format(DENIED)})
    assert r.json()["exit_code"] != 0
    plain = http.post("/v1/sessions", json={}).json()["id"]  # default stays none: only lo
    r = http.post(f"/v1/sessions/{plain}/exec", json={"cmd": "ip -o link | cut -d: -f2"})
    assert r.json()["stdout"].split() == ["lo"]
    assert network.has_veth(sid)
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    assert not network.has_veth(sid)
    assert f"sb-{sid}" not in sh("nft", "list", "table", "inet", SETTINGS.table).stdout


def test_a_daemon_stopping_with_no_bridged_sandbox_leaves_no_bridge_or_tables(daemon_factory):
    d = daemon_factory(network={"bridge": SETTINGS.bridge, "subnet": SETTINGS.subnet}).start()
    try:
        sid = d.client.post("/v1/sessions", json={"network_mode": "bridge"}).json()["id"]
        assert (network.SYS_NET / SETTINGS.bridge).exists()
        kept = d.client.post("/v1/sessions", json={"network_mode": "bridge"}).json()["id"]
        d.kill(signal.SIGTERM)   # a bridged sandbox outlives the daemon: its bridge stays
        assert (network.SYS_NET / SETTINGS.bridge).exists()
        d.start()
        for s in (sid, kept):
            assert d.client.delete(f"/v1/sessions/{s}").status_code == 200
        d.kill(signal.SIGTERM)
        assert not (network.SYS_NET / SETTINGS.bridge).exists(), "the bridge was left after stop"
        for family in ("inet", "bridge"):
            assert sh("nft", "list", "table", family, SETTINGS.table, check=False).returncode != 0
    finally:
        network.remove_host(SETTINGS)
