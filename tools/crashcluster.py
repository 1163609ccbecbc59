"""crashtest cluster mode (`tools/crashtest --cluster 3`): SIGKILL one host of a cluster at
random moments under a workload; the others declare it lost and recreate its sessions
(lost_sandbox_policy: recreate); it comes back under a new epoch. Then check that nothing
ran twice, nothing finished twice, and nothing leaked.

The cluster: a throwaway PostgreSQL server (tests/pg.py: initdb + pg_ctl in a temp dir) and
N daemons on this machine, each with its own host id, data dir, cgroup parent and loopback
port. Their `workspaces/` dirs are one shared dir (as NFS would be), so a session recreated
on another host keeps its workspace: every command appends its marker to
/workspace/runs, and a marker seen twice there is a command that ran twice, on any host.
Clients send each exec with an Idempotency-Key through a random live node (forwarded to the
owner) and retry through another node on a connection error or a 503.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime.sandboxes import Runtime

REPO = Path(__file__).resolve().parent.parent
API_KEY = "crashtest"


class Node:
    def __init__(self, work: Path, name: str, url: str, cgroup_parent: str, shared_ws: Path, cache: Path, port: int):
        self.name, self.work, self.data = name, work / name, work / name / "data"
        self.data.mkdir(parents=True)
        (self.data / "images").symlink_to(cache)
        (self.data / "workspaces").symlink_to(shared_ws)
        self.cgroup_parent = cgroup_parent
        self.url = f"http://127.0.0.1:{port}"
        self.config = self.work / "sandkasten.yaml"
        self.config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{port}", "api_key": API_KEY, "data_dir": str(self.data),
            "cgroup_parent": cgroup_parent, "default_image": "base", "session_ttl_seconds": 3600,
            "journal": {"url": url}, "reconcile": {"lost_sandbox_policy": "recreate"},
            "cluster": {"host_id": name, "heartbeat_seconds": 0.5, "host_timeout_seconds": 3}}))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.work / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen([str(REPO / ".venv/bin/sandkasten"), "--config", str(self.config)],
                                         stdout=log, stderr=log, start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"crashtest: daemon {self.name} exited; see {self.work}/daemon.log")
            try:
                if httpx.get(self.url + "/readyz", headers=auth(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"crashtest: daemon {self.name} not ready after 120 s")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()

    def cleanup(self) -> list[str]:
        rt = Runtime.detect(self.data, cgroup_parent=self.cgroup_parent)
        left = [f"{self.name}: host traces of {s}" for s in rt.host_sessions()]
        try:
            rt.remove_all()
        finally:
            rt.close()
        cgroups_mod.detect(parent=self.cgroup_parent).destroy_parent()
        return left


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


class Client:
    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        self.http = httpx.Client(headers=auth(), timeout=60)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + 180
        while True:
            live = [n for n in self.nodes if n.alive] or self.nodes
            node = random.choice(live)
            try:
                r = self.http.request(method, node.url + path, **kw)
                if r.status_code != 503:
                    return r
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: no answer for 180 s")
            time.sleep(0.05)


def worker(client: Client, sid: str, w: int, count: int, start: int, results: list, errors: list) -> None:
    for n in range(start, start + count):
        marker = f"w{w}-{n}"
        key = f"crash-{w}-{n}"
        cmd = f"echo {marker} >> /workspace/runs; sleep 0.{random.randint(1, 6)}; echo out-{marker}"
        r = client.request("POST", f"/v1/sessions/{sid}/exec", json={"cmd": cmd, "timeout_ms": 30000},
                           headers={"Idempotency-Key": key})
        body = r.json()
        results.append({"key": key, "marker": marker, "sid": sid, "status": r.status_code, "body": body})
        if r.status_code not in (200, 409, 410):  # 409/410: the exec or its sandbox was lost with its host
            errors.append(f"{key}: HTTP {r.status_code} {body.get('error_code')}: {body.get('message')}")


def run(args) -> int:
    from tests.pg import PgServer

    from sandkasten.images.build import build
    from sandkasten.images.store import ImageStore

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    work = Path(tempfile.mkdtemp(prefix="sk-crash-cluster-"))
    os.chmod(work, 0o755)
    cache = REPO / ".cache" / "images"
    cache.mkdir(parents=True, exist_ok=True)
    build(ImageStore(cache), "base")
    shared = work / "shared-workspaces"
    shared.mkdir(mode=0o700)
    pg = PgServer()
    nodes: list[Node] = []
    failures: list[str] = []
    print(f"crashtest cluster: seed={seed} hosts={args.cluster} work={work}", flush=True)
    try:
        pg.start()
        url = pg.database()
        from tests.pg import free_port

        names = [chr(ord("a") + i) for i in range(args.cluster)]
        nodes = [Node(work, n, url, f"sandkasten-crash-{os.getpid()}-{n}", shared, cache, free_port()) for n in names]
        for node in nodes:
            node.start()
        client = Client(nodes)
        sids = [client.request("POST", "/v1/sessions", json={"workspace_id": f"ws{i}"}).json()["id"]
                for i in range(args.sessions)]
        results: list[dict] = []
        errors: list[str] = []
        for rnd in range(args.rounds):
            threads = [threading.Thread(target=worker, args=(client, sid, w, args.execs_per_round,
                                                             rnd * args.execs_per_round, results, errors))
                       for w, sid in enumerate(sids)]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.2, 1.5))
            victim = random.choice(nodes)
            victim.signal(signal.SIGKILL)
            time.sleep(random.uniform(0, 5))  # sometimes back before the timeout, sometimes declared lost
            victim.start()
            for t in threads:
                t.join()
            print(f"  round {rnd + 1}/{args.rounds}: killed {victim.name}; {len(results)} execs answered",
                  flush=True)
        failures += errors
        runs = {sid: client.request("POST", f"/v1/sessions/{sid}/exec", json={"cmd": "cat /workspace/runs"})
                .json().get("stdout", "").split() for sid in sids}
        for sid in sids:
            client.request("DELETE", f"/v1/sessions/{sid}")
        for node in nodes:  # stopped before the journal checks: heartbeats would change it meanwhile
            node.signal(signal.SIGTERM)
        failures += check(runs, results, url)
        for node in nodes:
            failures += [f"leaked: {x}" for x in node.cleanup()]
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
            node.cleanup()
        pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for f in failures[:50]:
        print("FAIL", f)
    print("crashtest cluster: " + ("FAILED" if failures else "ok"))
    return 1 if failures else 0


def check(runs: dict[str, list[str]], results: list[dict], url: str) -> list[str]:
    """Exactly one terminal event per exec; no marker twice in a workspace; every finished
    exec's marker there; the chain intact and the read tables a replay of the journal."""
    import asyncio

    from sandkasten.store.journal import Journal

    async def read():
        j = await Journal.open(url)
        try:
            terminal: dict[str, list[str]] = {}
            for e in await j.events(limit=1_000_000, types=("exec.finished", "exec.lost")):
                terminal.setdefault(e.payload["exec_id"], []).append(e.type)
            placed = [e.payload["reason"] for e in await j.events(limit=1_000_000, types=("session.placed",))]
            hosts_lost = len(await j.events(limit=1_000_000, types=("host.lost",)))
            ok = (await j.verify()).ok
            live = await j.snapshot_read_tables()
            await j.rebuild()
            stats = {"hosts_lost": hosts_lost, "recreated": placed.count("recreate"),
                     "carried_over": placed.count("restart")}
            replayed = await j.snapshot_read_tables()
            for table, rows in live.items():
                again = [r for r in replayed[table]]
                for row in rows:
                    if row not in again:
                        other = next((r for r in replayed[table] if r.get("id") == row.get("id")), None)
                        diff = {k: (v, other.get(k) if other else None) for k, v in row.items()
                                if other is None or other.get(k) != v}
                        print(f"replay differs in {table} {row.get('id')}: live vs replay {diff}", flush=True)
            return terminal, ok, live == replayed, stats
        finally:
            await j.close()

    terminal, chain_ok, replay_ok, stats = asyncio.run(read())
    failures = [] if chain_ok else ["the hash chain is broken"]
    if not replay_ok:
        failures.append("read tables differ from a replay of the journal")
    finished = lost = dup = 0
    for r in results:
        eid = r["body"].get("exec_id") or (r["body"].get("details") or {}).get("exec_id")
        if eid is None:
            continue
        r["exec_id"] = eid
        kinds = terminal.get(eid, [])
        if len(kinds) != 1:
            failures.append(f"{r['key']} ({eid}): {len(kinds)} terminal events {kinds}")
        finished += kinds == ["exec.finished"]
        lost += kinds == ["exec.lost"]
    for sid, lines in runs.items():
        seen: dict[str, int] = {}
        for line in lines:
            seen[line] = seen.get(line, 0) + 1
        for m, n in seen.items():
            if n > 1:
                dup += 1
                failures.append(f"command {m} ran {n} times")
        for r in results:
            if r["sid"] == sid and terminal.get(r.get("exec_id")) == ["exec.finished"] \
                    and r["marker"] not in seen:
                failures.append(f"command {r['marker']} reported finished but never ran")
    print(json.dumps({"execs": len(results), "finished": finished, "lost": lost, "duplicated": dup, **stats}))
    return failures
