"""The daemon: journal + runtime + executor + reconciler behind the Sanic API.

`sandkasten --config sandkasten.yaml` runs it in the foreground; `sandkasten daemon -d`
starts the same command in the background (pid and log under data_dir/run/);
`sandkasten stop` stops it. Stopping the daemon never stops sandboxes: they outlive it and
are adopted by the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sandkasten import install
from sandkasten.config import Config
from sandkasten.control.endings import Endings
from sandkasten.domain.commands import RequestSession
from sandkasten.errors import SandkastenError
from sandkasten.control.executor import Executor
from sandkasten.files.log_watch import LogWatch
from sandkasten.control.pool import Pool
from sandkasten.control.process_control import ProcessControl
from sandkasten.control.reconciler import Reconciler
from sandkasten.runtime import client, network
from sandkasten.runtime.layout import Layout
from sandkasten.runtime.procfs import proc_start_time
from sandkasten.runtime.sandboxes import Runtime, read_pidfile
from sandkasten.service import Files, Service, Sessions, Settling, Workspaces
from sandkasten.store.journal import Journal

if TYPE_CHECKING:  # imported when the journal is shared only (import time)
    from sandkasten.cluster.membership import Membership

log = logging.getLogger("sandkasten.daemon")


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ready = False
        self.stopping = False
        self.readiness: dict = {"phase": "starting"}
        self.tasks: list[asyncio.Task] = []
        self.journal: Journal
        self.runtime: Runtime
        self.executor: Executor
        self.reconciler: Reconciler
        self.pool: Pool
        self.cluster: Membership | None = None  # when the journal is shared
        self.processes: ProcessControl
        self.service: Service   # what the API's handlers call (create, exec, destroy, files, workspaces)
        self.log_watch = LogWatch()
        self.endings = Endings()
        # seconds since this process started, when serve() began (imports done), the app and
        # server were up, the journal open and the reconcile done: where a restart's time goes
        self.phases: dict[str, float] = {"imported_s": _process_age()}

    async def start(self) -> None:
        cfg = self.cfg
        self.phases["serving_s"] = _process_age()
        self.journal = await Journal.open(cfg.journal_target, cfg.journal.durability,
                                          busy_timeout_s=cfg.journal.busy_timeout_s)
        self.journal.listeners.append(self.endings.committed)   # streams wake when an end is committed
        self.runtime = Runtime.detect(cfg.data_dir, cgroup_parent=install.cgroup_parent(cfg),
                                      network=network.from_config(cfg.network))
        await asyncio.to_thread(self.runtime.cgroups.ensure_parent)
        self.executor = Executor(cfg, self.journal, self.runtime)
        self.processes = ProcessControl(self.executor)
        self.reconciler = Reconciler(cfg, self.executor, self.processes)
        self.pool = Pool(cfg, self.executor)
        if cfg.shared_journal:  # one host of several on a journal in PostgreSQL (docs/cluster.md)
            from sandkasten.cluster.membership import Membership

            cluster = Membership(cfg, self.executor)
            cluster.reconciler = self.reconciler
            self.cluster = self.executor.cluster = cluster
        waiter = Settling(self.executor, lambda: self.stopping)
        files = Files(self.journal)
        self.service = Service(
            sessions=Sessions(cfg, self.journal, waiter, pool=self.pool, reserve_id=self._spare_id),
            files=files, workspaces=Workspaces(cfg, self.journal, waiter, files, self.executor))
        self.phases["journal_open_s"] = _process_age()
        self.tasks.append(asyncio.ensure_future(self._become_ready()))

    def _spare_id(self, cmd: RequestSession) -> str | None:
        """An id the spawner has a spare for creates faster (not in a cluster: the session may land
        elsewhere; not bridged: a bridged sandbox never takes a spare, so not a spare's id either)."""
        if self.cluster is not None or cmd.network_mode == "bridge":
            return None
        return self.runtime.reserve_id()

    async def _become_ready(self) -> None:
        self.readiness = {"phase": "reconciling"}
        try:
            if self.cluster is not None:  # a new epoch first: what is ours is known before reconciling
                await self.cluster.join()
            stats = await self.reconciler.startup()
        except Exception as e:  # stay up and say why we are not ready
            log.exception("startup reconcile failed")
            self.readiness = {"phase": "failed", "error": str(e)}
            return
        if self.cluster is not None:
            from sandkasten.cluster.follower import Follower

            self.tasks.append(asyncio.ensure_future(Follower(self.cluster).run()))  # LISTEN/NOTIFY
            self.tasks.append(asyncio.ensure_future(self.cluster.run()))            # heartbeat, peers
        else:
            self.tasks.append(asyncio.ensure_future(self.executor.follow()))
        self.tasks.append(asyncio.ensure_future(self.reconciler.watch()))
        self.tasks.append(asyncio.ensure_future(self.pool.run()))  # trims, then refills; idle members outlive stop
        self.phases["ready_s"] = _process_age()
        self.readiness = {"phase": "ready", "reconcile": stats, "startup": dict(self.phases)}
        self.ready = True
        self.tasks.append(asyncio.ensure_future(asyncio.to_thread(self.runtime.warm)))   # spares for the first creates

    async def begin_stop(self) -> None:
        """First half of a stop, while connections still drain: the background loops and the
        executor's tasks end (a command keeps running in its sandbox; the next daemon journals
        its result), requests in flight answer 503 NOT_READY, which clients retry with the same
        Idempotency-Key, and new ones get the same answer (see api.app)."""
        self.stopping = True
        self.ready = False
        self.readiness = {"phase": "stopping"}
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.executor.stop()

    async def stop(self) -> None:
        """Second half, once no request is left: release the runtime and the journal."""
        if not self.stopping:
            await self.begin_stop()
        client.close_idle()   # connections kept to the runners
        await asyncio.to_thread(self.runtime.close)
        await asyncio.to_thread(self.runtime.cgroups.release_parent)  # no trace when no sandbox is left
        try:
            await asyncio.to_thread(network.release_host, self.runtime.network)  # nor a bridge, nor nft tables
        except SandkastenError as e:
            log.warning("unable to remove the bridge %s: %s", self.runtime.network.bridge, e.message)
        await self.journal.close()
        self.log_watch.close()


def _process_age() -> float:
    """Seconds since this process started (/proc; clock-tick resolution)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started = int(f.read().rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", "rb") as f:
            return round(float(f.read().split()[0]) - started, 3)
    except (OSError, ValueError, IndexError):
        return -1.0


def pidfile(cfg: Config) -> Path:
    return cfg.run_dir / "daemon.pid"


def running_pid(cfg: Config) -> int | None:
    pid, st = read_pidfile(pidfile(cfg))
    if pid is not None and proc_start_time(pid) == st:
        return pid
    return None


def preflight(cfg: Config) -> None:
    """What can fail before serving fails here, with one clear line instead of a server
    traceback: directories, the journal (opened and migrated), the cgroup layout."""
    from sandkasten.runtime import cgroups

    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SandkastenError(f"unable to create directory {cfg.data_dir}: {e.strerror}") from None
    # What is under them (commands, output, env, workspaces) is for root only: sandboxes reach
    # their parts through mounts made before they drop privileges, never through these paths.
    for d in (cfg.run_dir, cfg.sessions_dir, cfg.workspaces_dir, cfg.images_dir, Layout(cfg.data_dir).logs):
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        except OSError as e:
            raise SandkastenError(f"unable to create directory {d}: {e.strerror}") from None
    Journal.check(cfg.journal_target, cfg.journal.busy_timeout_s, full=cfg.journal.startup_check == "full")
    cgroups.detect(parent=install.cgroup_parent(cfg))


def serve(cfg: Config) -> int:
    """Run in the foreground until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    other = running_pid(cfg)
    if other is not None and other != os.getpid():
        print(f"sandkasten: unable to start: a daemon (pid {other}) already runs with data_dir {cfg.data_dir}",
              file=sys.stderr)
        return 1
    try:
        preflight(cfg)
        # held until this process exits: a second daemon on the same cgroup parent refuses to start
        claim = install.ParentClaim.take(install.cgroup_parent(cfg), cfg.data_dir)
    except SandkastenError as e:
        print(f"sandkasten: {e.message}", file=sys.stderr)
        return 1
    try:
        return _serve(cfg)
    finally:
        claim.release()


def _serve(cfg: Config) -> int:
    """The Sanic server, once the checks passed and the cgroup parent is ours."""
    from sanic import Sanic

    from sandkasten.api.app import create_app

    daemon = Daemon(cfg)
    app = create_app(daemon)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        await daemon.start()
        pf = pidfile(cfg)
        pf.write_text(f"{os.getpid()} {proc_start_time(os.getpid())}\n")
        log.info("sandkasten listening on http://%s:%d (data_dir %s)", cfg.host, cfg.port, cfg.data_dir)

    @app.before_server_stop
    async def _begin_stop(app: Sanic) -> None:
        await daemon.begin_stop()

    @app.after_server_stop
    async def _stop(app: Sanic) -> None:
        await daemon.stop()
        if running_pid(cfg) == os.getpid():
            pidfile(cfg).unlink(missing_ok=True)

    try:
        app.run(host=cfg.host, port=cfg.port, single_process=True, motd=False, access_log=False)
    except OSError as e:
        print(f"sandkasten: unable to listen on {cfg.listen}: {e.strerror or e}", file=sys.stderr)
        return 1
    except SandkastenError as e:
        print(f"sandkasten: {e.message}", file=sys.stderr)
        return 1
    return 0


def start_background(cfg: Config, config_path: str | None, wait_s: float = 30.0) -> int:
    """Start `sandkasten --config …` detached; return once /healthz answers."""
    import httpx

    other = running_pid(cfg)
    if other is not None:
        print(f"sandkasten: already running (pid {other})")
        return 0
    if _listening(cfg.host, cfg.port):
        # its /healthz would answer for ours: `daemon -d` said "started" while ours failed to bind
        print(f"sandkasten: unable to start the daemon: {cfg.listen} is already in use by another process",
              file=sys.stderr)
        return 1
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    logfile = cfg.run_dir / "daemon.log"
    args = [sys.executable, "-m", "sandkasten.cli.main"] + (["--config", config_path] if config_path else [])
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + wait_s
    url = f"http://{cfg.host}:{cfg.port}/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"sandkasten: the daemon exited with code {proc.returncode}; see {logfile}", file=sys.stderr)
            return 1
        try:
            if httpx.get(url, timeout=1).status_code == 200 and running_pid(cfg) == proc.pid:
                # it answers; started means ready: changes are refused until the start-up reconcile is done
                ready = httpx.get(f"http://{cfg.host}:{cfg.port}/readyz", timeout=5, headers=_auth(cfg))
                if ready.status_code == 200:
                    print(f"sandkasten: daemon started (pid {proc.pid}), log {logfile}")
                    return 0
                detail = ready.json().get("detail", {}) if ready.status_code == 503 else {}
                if detail.get("phase") == "failed":
                    print(f"sandkasten: the daemon (pid {proc.pid}) runs but its start-up reconcile failed "
                          f"({detail.get('error')}): it refuses changes; see {logfile}", file=sys.stderr)
                    return 1
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    print(f"sandkasten: the daemon did not answer on {url} within {wait_s:.0f}s; see {logfile}", file=sys.stderr)
    return 1


def _auth(cfg: Config) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _listening(host: str, port: int) -> bool:
    """Whether something already accepts connections on host:port."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_background(cfg: Config, wait_s: float = 20.0) -> int:
    pid = running_pid(cfg)
    if pid is None:
        print("sandkasten: no daemon is running for this data_dir")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc_start_time(pid) is None:
            print(f"sandkasten: daemon (pid {pid}) stopped; sandboxes keep running")
            return 0
        time.sleep(0.1)
    print(f"sandkasten: daemon (pid {pid}) did not stop within {wait_s:.0f}s", file=sys.stderr)
    return 1
