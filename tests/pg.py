"""A real PostgreSQL server for the tests, started by the suite itself and removed after.

Who runs this: pytest (as root on CI). `initdb` + `pg_ctl start` from Debian's `postgresql`
package (tools/debian-deps installs it) make a throwaway cluster in a temp dir, listening on
a free loopback port and a unix socket in that dir only. PostgreSQL refuses to run as root,
so the server runs as the `postgres` system user the package creates (`runuser`); the dir
is made for that user and removed after the run, also when a test failed. Each test gets
its own database (`PgServer.database()`), so tests never see each other's journals.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def pg_bin(name: str) -> str | None:
    """`initdb`/`pg_ctl` from PATH or the newest /usr/lib/postgresql/<v>/bin (Debian keeps them there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sk-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.user = "postgres"
        self.started = False
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")  # made by Debian's postgresql package
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)
            self._as = ["runuser", "-u", "postgres", "--"]
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"unable to run {args[0]}: exit {proc.returncode}: {proc.stderr.strip()} {log}")

    def start(self) -> "PgServer":
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("unable to start PostgreSQL for the tests: initdb/pg_ctl not found "
                               "(tools/debian-deps installs the postgresql package)")
        # C collation: text sorts by bytes, as in SQLite (ids and ISO timestamps order alike)
        self._run(initdb, "-D", str(self.data), "-U", self.user, "--auth=trust", "--locale=C",
                  "--encoding=UTF8", "--no-sync")
        for attempt in range(3):
            opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            try:
                self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
                break
            except RuntimeError as e:
                # the free port was taken between free_port() and the bind (parallel test
                # workers, other runs on this machine): another free port, at most twice
                if attempt == 2 or "already in use" not in str(e):
                    raise
                self.port = free_port()
        self.started = True
        return self

    def stop(self) -> None:
        try:
            if self.started:
                self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            self.started = False
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def database(self, driver: str = "psycopg") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "sk_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, driver)
