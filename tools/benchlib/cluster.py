"""Several hosts on one shared journal (PostgreSQL): exec latency through a node that does not
own the session (forwarded over HTTP to the owner) next to the owner itself, and create
throughput with three hosts next to one.

Who runs this: the bench process (root). A throwaway PostgreSQL server (tests/pg.py: initdb +
pg_ctl in a temp dir, removed at the end through `Fleet.closers`) and daemons on this machine,
each with its own host id, data dir, cgroup parent and port. On one machine three hosts share
its two cores: the create rows show the cost of placement and of the shared journal, not the
capacity a cluster of real machines adds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import execs
from benchlib.daemon import BenchDaemon, Fleet, Http
from benchlib.report import Report
from benchlib.samples import Summary, time_ms

SECTION = "cluster (three hosts on one PostgreSQL journal, one machine)"


def _server(fleet: Fleet):
    from tests.pg import PgServer

    server = PgServer()
    fleet.closers.append(server.stop)
    return server.start()


def _hosts(fleet: Fleet, url: str, prefix: str, names: tuple[str, ...]) -> list[BenchDaemon]:
    made = []
    for name in names:
        d = fleet.daemon(f"{prefix}-{name}", journal={"url": url},
                         cluster={"host_id": name, "heartbeat_seconds": 1, "host_timeout_seconds": 10})
        d.start()
        made.append(d)
    return made


def _create_rate(hosts: list[BenchDaemon], n: int, clients: int = 6) -> tuple[float, Summary, list]:
    """n creates from `clients` threads spread over the hosts' APIs: (creates/s, latency, ids)."""
    latencies, ids = [], []

    def one(i: int) -> None:
        http = Http(hosts[i % len(hosts)].port)
        try:
            t0 = time.perf_counter()
            ids.append(http.ok("POST", "/v1/sessions", {})["id"])
            latencies.append((time.perf_counter() - t0) * 1000)
        finally:
            http.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0), Summary.of(latencies), ids


def _delete(hosts: list[BenchDaemon], ids: list) -> None:
    http = hosts[0].http()
    try:
        for sid in ids:
            http.ok("DELETE", f"/v1/sessions/{sid}")
    finally:
        http.close()


def cluster(report: Report, fleet: Fleet, n_exec: int, n_create: int) -> None:
    lite = fleet.daemon("cluster-sqlite")  # the embedded default, measured the same way
    lite.start()
    rate0, lat0, ids = _create_rate([lite], n_create)
    _delete([lite], ids)
    lite.kill()
    server = _server(fleet)
    one = _hosts(fleet, server.database(), "solo", ("a",))
    rate1, lat1, ids = _create_rate(one, n_create)
    _delete(one, ids)
    http = one[0].http()
    sid = http.ok("POST", "/v1/sessions", {})["id"]
    report.add(SECTION, "cluster.exec.solo", "HTTP exec `:`, one host on PostgreSQL",
               time_ms(lambda: execs.http_exec(http, sid, ":"), n_exec, warmup=10))
    http.ok("DELETE", f"/v1/sessions/{sid}")
    http.close()
    for d in one:
        d.kill()

    three = _hosts(fleet, server.database(), "trio", ("a", "b", "c"))
    owner_http, other_http = three[1].http(), three[0].http()
    sid = None
    for _ in range(3):  # least loaded first: one of the first three creates lands on b
        s = other_http.ok("POST", "/v1/sessions", {})
        if s.get("host_id") == "b":
            sid = s["id"]
            break
    if sid is None:
        raise RuntimeError("no session landed on host b")
    report.add(SECTION, "cluster.exec.owner", "HTTP exec `:` on the owning host",
               time_ms(lambda: execs.http_exec(owner_http, sid, ":"), n_exec, warmup=10))
    report.add(SECTION, "cluster.exec.forwarded", "HTTP exec `:` through a non-owning host",
               time_ms(lambda: execs.http_exec(other_http, sid, ":"), n_exec, warmup=10))
    owner_http.close()
    other_http.close()
    _delete(three, _all_ids(three))
    rate3, lat3, ids = _create_rate(three, n_create)
    _delete(three, ids)
    report.add(SECTION, "cluster.create.rate.sqlite", "create throughput, 1 host on SQLite (6 clients)",
               value=rate0, unit="/s")
    report.add(SECTION, "cluster.create.rate.1", "create throughput, 1 host on PostgreSQL", value=rate1, unit="/s")
    report.add(SECTION, "cluster.create.rate.3", "create throughput, 3 hosts (6 clients over 3 APIs)",
               value=rate3, unit="/s")
    report.add(SECTION, "cluster.create.sqlite", "  POST /v1/sessions latency, 1 host on SQLite", lat0)
    report.add(SECTION, "cluster.create.1", "  POST /v1/sessions latency, 1 host", lat1)
    report.add(SECTION, "cluster.create.3", "  POST /v1/sessions latency, 3 hosts", lat3)
    for d in three:
        d.kill()


def _all_ids(hosts: list[BenchDaemon]) -> list[str]:
    http = hosts[0].http()
    try:
        return [s["id"] for s in http.ok("GET", "/v1/sessions")]
    finally:
        http.close()


def ratios(report: Report) -> None:
    report.ratio("exec through a non-owning host / on the owner", "cluster.exec.forwarded", "cluster.exec.owner")
    report.ratio("exec on the owner, 3 hosts / one host on PostgreSQL", "cluster.exec.owner", "cluster.exec.solo")
    report.ratio("create throughput 3 hosts / 1 host", "cluster.create.rate.3", "cluster.create.rate.1")
    report.ratio("create throughput 1 host: PostgreSQL / SQLite", "cluster.create.rate.1", "cluster.create.rate.sqlite")
