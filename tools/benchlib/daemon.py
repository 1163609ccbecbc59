"""A real daemon on a free loopback port, a lean HTTP client for it, and the cleanup of
everything a bench run made.

Who runs this: the bench process (root). Each daemon gets its own data dir under the run's
temp dir and its own cgroup parent (`sandkasten-bench-<pid>-<n>`): a daemon's startup sweep
removes every unknown sandbox under *its* parent, so two daemons must never share one.
`Fleet.close` stops every daemon, destroys every sandbox through `Runtime.destroy`, removes
the cgroup parents and the temp dir — on success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime import network
from sandkasten.runtime.procfs import mounts_under
from sandkasten.runtime.sandboxes import Runtime

REPO = Path(__file__).resolve().parents[2]
API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    """One keep-alive HTTP/1.1 connection (stdlib `http.client`: the leanest client at hand,
    so the client's own cost stays small next to what is measured)."""

    def __init__(self, port: int, timeout: float = 300):
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                r = self.conn.getresponse()
                raw = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # the server closed an idle keep-alive connection before this request arrived
                self.conn.close()
                if attempt:
                    raise
        try:
            return r.status, json.loads(raw) if raw else {}
        except ValueError:
            return r.status, {"raw": raw.decode(errors="replace")}

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        status, reply = self.call(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status} {reply}")
        return reply

    def close(self) -> None:
        self.conn.close()


class BenchDaemon:
    def __init__(self, fleet: Fleet, name: str, **overrides):
        self.work = fleet.tmp / name
        self.data = self.work / "data"
        self.data.mkdir(parents=True)
        (self.data / "images").symlink_to(fleet.images)
        self.cgroup_parent = f"sandkasten-bench-{os.getpid()}-{name}"
        self.port = free_port()
        self.config = self.work / "sandkasten.yaml"
        # a bridge and subnet of its own (never the operator's sk0), removed in teardown()
        self.network = network.Settings(bridge=f"skb{os.getpid() % 100000}", subnet=f"10.250.{len(fleet.daemons)}.0/24")
        cfg = {"listen": f"127.0.0.1:{self.port}", "api_key": API_KEY, "data_dir": str(self.data),
               "cgroup_parent": self.cgroup_parent, "default_image": "base", "session_ttl_seconds": 7200,
               "network": {"bridge": self.network.bridge, "subnet": self.network.subnet},
               # admission off: recovery and density hold thousands of idle sandboxes, each granted
               # a memory limit it never uses (the defaults would refuse the 95th on this host)
               "limits": {"max_sessions": 100_000, "max_total_mem_mb": 1 << 30}, **overrides}
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.argv = [str(REPO / ".venv/bin/sandkasten"), "--config", str(self.config)]
        fleet.daemons.append(self)

    def start(self, argv_prefix: list[str] | None = None) -> tuple[float, float]:
        """Start and wait for /readyz; (seconds until /healthz answered, until /readyz)."""
        t0 = time.perf_counter()
        with open(self.work / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen((argv_prefix or []) + self.argv, stdout=log, stderr=log,
                                         start_new_session=True)
        healthy = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
            status = probe(self.port, "/readyz")
            now = time.perf_counter() - t0
            if status is not None and healthy is None:
                healthy = now
            if status == 200:
                return healthy, now
            if now > 120:
                raise RuntimeError(f"daemon not ready after 120 s: {self.log_tail()}")
            time.sleep(0.002)

    def log_tail(self) -> str:
        try:
            return (self.work / "daemon.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def http(self) -> Http:
        return Http(self.port)

    def socket_of(self, sid: str) -> Path:
        return self.data / "run" / sid / "runner.sock"

    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cgroups(self) -> cgroups_mod.Cgroups:
        return cgroups_mod.detect(parent=self.cgroup_parent)

    def teardown(self) -> list[str]:
        """Stop, destroy every sandbox (4 at a time), remove the cgroup parent. Problems found."""
        problems = []
        self.kill(signal.SIGTERM)
        rt = Runtime.detect(self.data, cgroup_parent=self.cgroup_parent)
        try:
            if hasattr(rt, "remove_all"):
                rt.remove_all(workers=4)
            else:   # an older checkout, measured by the same tools
                for sid in rt.host_sessions():
                    rt.destroy(sid)
        except Exception as e:  # noqa: BLE001 - keep tearing the rest down
            problems.append(f"destroy the sandboxes of {self.data}: {e}")
        finally:
            rt.close()
        try:
            network.remove_host(self.network)
        except Exception as e:  # noqa: BLE001
            problems.append(f"bridge {self.network.bridge}: {e}")
        try:
            self.cgroups().destroy_parent()
        except Exception as e:  # noqa: BLE001
            problems.append(f"cgroup parent {self.cgroup_parent}: {e}")
        return problems


class Fleet:
    """Everything one bench run creates: a temp dir, daemons, direct runtimes."""

    def __init__(self, images: Path):
        self.images = images
        for name in cgroups_mod.orphaned_run_parents("sandkasten-bench-"):   # a killed earlier run's
            cgroups_mod.detect(parent=name).destroy_parent()
        self.tmp = Path(tempfile.mkdtemp(prefix="sk-bench-"))
        os.chmod(self.tmp, 0o755)
        self.daemons: list[BenchDaemon] = []
        self.runtimes: list[tuple[Runtime, str]] = []
        self.closers: list = []

    def daemon(self, name: str, **overrides) -> BenchDaemon:
        return BenchDaemon(self, name, **overrides)

    def runtime(self, name: str) -> Runtime:
        """A Runtime (zygote spawner) in this process, for the no-daemon baseline."""
        data = self.tmp / name / "data"
        data.mkdir(parents=True)
        (data / "images").symlink_to(self.images)
        parent = f"sandkasten-bench-{os.getpid()}-{name}"
        rt = Runtime.detect(data, cgroup_parent=parent)
        self.runtimes.append((rt, parent))
        return rt

    def close(self) -> list[str]:
        problems: list[str] = []
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001
                problems.append(str(e))
        for d in self.daemons:
            problems += d.teardown()
        for rt, parent in self.runtimes:
            try:
                try:
                    rt.remove_all()
                finally:
                    rt.close()
                cgroups_mod.detect(parent=parent).destroy_parent()
            except Exception as e:  # noqa: BLE001
                problems.append(f"runtime {parent}: {e}")
        left = mounts_under(self.tmp)
        if left:
            problems.append(f"mounts left under {self.tmp}, not removing it: {left[:5]}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def probe(port: int, path: str) -> int | None:
    """Status of one GET (new connection), None when nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
