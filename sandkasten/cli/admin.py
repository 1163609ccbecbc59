"""The `sandkasten` commands that look after the journal and the host rather than drive
sessions: audit export and verify, journal rebuild, doctor, security, version. A mixin of
`sandkasten.cli.main.Cli`, whose `cfg`, `journal()` and `daemon_pid()` it uses; errors are raised
as `cli.args` exceptions, which `cli.main` prints as one line."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
from datetime import datetime, UTC
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sandkasten import __version__
from sandkasten.cli import render
from sandkasten.cli.args import Exit, Failed, Usage, parse_since, text
from sandkasten.errors import SandkastenError, SessionNotFound
from sandkasten.store import integrity

if TYPE_CHECKING:
    from sandkasten.config import Config

T = TypeVar("T")


def _why(result) -> str:
    """A failed verification's reason without its 'event N: ' prefix (the seq is shown apart)."""
    return re.sub(r"^event \d+: ", "", result.reason)


class AdminCommands:
    if TYPE_CHECKING:  # what the mixin uses of `Cli` (sandkasten/cli/main.py), which defines them
        @property
        def cfg(self) -> Config: ...

        def journal(self, work: Callable[[Any], Awaitable[T]], create: bool = False) -> T: ...

        def daemon_pid(self) -> int | None: ...

    def audit_export(self, format: str = "jsonl", since: Any = None, session: Any = None,  # noqa: A002
                     output: Any = None) -> None:
        """Write every command ever run (actor, time, session, exec id, cmd, cwd, exit code,
        duration, output sha256, status), oldest first.

        Args:
          format: jsonl or csv
          since: only commands requested since then: an age (30m, 1h, 2d, 1w) or an ISO time
          session: only this session's commands
          output: write to FILE instead of stdout
        """
        from sandkasten.store import audit

        fmt = text(format, "--format")
        if fmt not in audit.FORMATS:
            raise Usage(f"--format must be one of {', '.join(audit.FORMATS)} (got {fmt!r})")
        start = parse_since(since, datetime.now(UTC))
        sid = text(session, "--session") if session is not None else None
        path = Path(text(output, "--output")) if output is not None else None

        async def work(journal) -> int:
            if sid is not None and await journal.session(sid) is None:
                raise SessionNotFound(f"unable to export the audit of session {sid!r}: no such session")
            if path is None:
                return await audit.export(journal, fmt, start, sid, out=sys.stdout)
            try:
                out = await asyncio.to_thread(open, path, "w", newline="", encoding="utf-8")
            except OSError as e:
                why = f"directory {path.parent} does not exist" if isinstance(e, FileNotFoundError) else e.strerror
                raise Failed(f"unable to write the audit export to {path}: {why}") from None
            with out:
                return await audit.export(journal, fmt, start, sid, out=out)

        count = self.journal(work)
        if path is not None:
            print(f"sandkasten: exported {count} command{'s' * (count != 1)} to {path}", file=sys.stderr)

    def audit_verify(self, json: bool = False) -> None:
        """Check the journal file (SQLite integrity_check: pages and every index) and recompute the
        hash chain over every event; exit 1 naming what is damaged or the first event that disagrees.

        Args:
          json: print {ok, checked, first_bad_seq, reason, damage}
        """
        from sandkasten.store import audit

        damage = self._damage()
        try:
            result = self.journal(audit.verify)
        except SandkastenError:
            if not damage:
                raise
            result = None
        reason = _why(result) if result is not None else "the chain could not be read"
        ok = result is not None and result.ok and not damage
        if json:
            render.print_json({"ok": ok, "checked": result.checked if result else 0,
                               "first_bad_seq": result.first_bad_seq if result else None,
                               "reason": reason, "damage": damage})
        else:
            if damage:
                print(f"journal file damaged: {integrity.summary(damage)} (with the daemon stopped, "
                      f"`sandkasten journal rebuild` rebuilds the read tables and every index)")
            if result is not None and result.ok:
                print(f"{'chain ' if damage else ''}ok: {result.checked} events verified")
            elif result is not None:
                print(f"journal tampered: first bad event seq={result.first_bad_seq} ({reason})")
        if not ok:
            raise Exit(1)

    def _damage(self) -> list[str]:
        """What SQLite finds wrong with the journal file ([] when it is fine or absent)."""
        path = self.cfg.database_path
        return integrity.problems(path, busy_timeout_s=self.cfg.journal.busy_timeout_s) if path.exists() else []

    def journal_rebuild(self, force: bool = False) -> None:
        """Rebuild every index of the journal file from its tables (REINDEX), empty the read tables
        (sessions, execs, workspaces) and replay every event into them.

        Args:
          force: rebuild even when the hash chain is broken (the tables then show tampered events)
        """
        from sandkasten.store import audit

        pid = self.daemon_pid()
        if pid is not None:
            raise Failed(f"unable to rebuild the journal: the daemon (pid {pid}) is running; "
                         "stop it first (sandkasten stop)")
        path = self.cfg.database_path
        if path.exists():
            try:  # first: a damaged index makes the replay's deletes and lookups fail or miss
                integrity.reindex(path, self.cfg.journal.busy_timeout_s)
            except sqlite3.Error as e:
                raise Failed(f"unable to rebuild the indexes of journal {path}: {e}; restore a backup") from None
        checked = self.journal(audit.verify)
        if not checked.ok and not force:
            raise Failed(f"unable to rebuild the journal: its hash chain breaks at event {checked.first_bad_seq} "
                         f"({_why(checked)}), so the read tables would show what was tampered with; see "
                         "sandkasten audit verify, or pass --force to rebuild anyway")
        count = self.journal(lambda j: j.rebuild())
        left = self._damage()
        if left:
            raise Failed(f"rebuilt the read tables from {count} event{'s' * (count != 1)}, but the journal file is "
                         f"still damaged: {integrity.summary(left)}; restore a backup")
        print(f"rebuilt the read tables and indexes from {count} event{'s' * (count != 1)}")

    def security(self, json: bool = False) -> None:
        """What confines a sandbox under this config (namespaces, privileges, seccomp profile, disk,
        host-wide pools) and the gaps that remain.

        Args:
          json: print it as an object
        """
        from sandkasten import confinement

        sec = self.cfg.security
        report = confinement.report(self.cfg)
        if json:
            render.print_json(report)
            return
        render.table(["WHAT", "SETTING"], [
            ["namespaces", ", ".join(report["namespaces"])],
            ["commands run as", f"uid {sec.run_as_uid}, gid {sec.run_as_gid}"],
            ["capabilities", report["capabilities"]],
            ["no_new_privs", "on"],
            ["seccomp", f"{sec.seccomp}: {len(report['seccomp']['denied'])} syscalls refused"],
            ["socket families", report["seccomp"]["socket_families"]],
            ["root filesystem", report["rootfs"]],
            ["disk", report["disk"]],
            ["host-wide pools", report["shared_host_pools"]],
            ["network (default)", report["network_default"]],
        ])
        if report["seccomp"]["denied"]:
            print("refused syscalls: " + " ".join(report["seccomp"]["denied"]))
        print("\nremaining gaps (what this does not protect against):")
        for gap in report["gaps"]:
            print(f"  - {gap}")

    def doctor(self, json: bool = False) -> None:
        """Check the journal file (SQLite integrity_check) and compare the journal with what exists
        on the host; exit 1 when the file is damaged or they disagree.

        Args:
          json: print {checked, damage: [...], drift: [...]}
        """
        from sandkasten.control.doctor import find_drift
        from sandkasten.runtime.sandboxes import Runtime

        cfg = self.cfg
        from sandkasten import install

        damage = self._damage()
        host = cfg.host_id if cfg.shared_journal else None  # a cluster: this host's sessions

        async def work(journal):  # only once the journal is known to exist: nothing is made before
            runtime = Runtime.detect(cfg.data_dir, cgroup_parent=install.cgroup_parent(cfg))
            try:
                return await find_drift(journal, runtime, host)
            finally:
                runtime.close()

        drift, checked = self.journal(work)
        if json:
            render.print_json({"checked": checked, "damage": damage, "drift": [d.__dict__ for d in drift]})
        elif not drift and not damage:
            print(f"ok: {checked} session{'s' * (checked != 1)} in the journal, no drift with the host")
        else:
            if damage:
                print(f"journal file damaged: {integrity.summary(damage)} (with the daemon stopped, "
                      f"`sandkasten journal rebuild` rebuilds the read tables and every index)")
            if drift:
                render.table(["SESSION", "JOURNAL", "KERNEL", "PROBLEM"],
                             [[d.session_id, d.journal, d.kernel, d.problem] for d in drift])
        if drift or damage:
            raise Exit(1)

    def version(self, json: bool = False) -> None:
        """Print the version.

        Args:
          json: print {"version": ...}
        """
        if json:
            render.print_json({"version": __version__})
        else:
            print(f"sandkasten {__version__}")
