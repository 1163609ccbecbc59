"""The `sandkasten` commands that look after the journal and the host rather than drive
sessions: audit export and verify, journal rebuild, doctor, security, version. A mixin of
`sandkasten.cli.Cli`, whose `cfg`, `journal()` and `daemon_pid()` it uses; errors are raised
as `cli_args` exceptions, which `cli.main` prints as one line."""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sandkasten import __version__
from sandkasten import cli_render as render
from sandkasten.cli_args import Exit, Failed, Usage, parse_since, text
from sandkasten.errors import SessionNotFound


def _why(result) -> str:
    """A failed verification's reason without its 'event N: ' prefix (the seq is shown apart)."""
    return re.sub(r"^event \d+: ", "", result.reason)


class AdminCommands:
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
        start = parse_since(since, datetime.now(timezone.utc))
        sid = text(session, "--session") if session is not None else None
        path = Path(text(output, "--output")) if output is not None else None

        async def work(journal) -> int:
            if sid is not None and await journal.session(sid) is None:
                raise SessionNotFound(f"unable to export the audit of session {sid!r}: no such session")
            if path is None:
                return await audit.export(journal, fmt, start, sid, out=sys.stdout)
            try:
                out = open(path, "w", newline="", encoding="utf-8")
            except OSError as e:
                why = f"directory {path.parent} does not exist" if isinstance(e, FileNotFoundError) else e.strerror
                raise Failed(f"unable to write the audit export to {path}: {why}") from None
            with out:
                return await audit.export(journal, fmt, start, sid, out=out)

        count = self.journal(work)
        if path is not None:
            print(f"sandkasten: exported {count} command{'s' * (count != 1)} to {path}", file=sys.stderr)

    def audit_verify(self, json: bool = False) -> None:
        """Recompute the hash chain over every event; exit 1 naming the first event that disagrees.

        Args:
          json: print {ok, checked, first_bad_seq, reason}
        """
        from sandkasten.store import audit

        result = self.journal(audit.verify)
        reason = _why(result)
        if json:
            render.print_json({"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                               "reason": reason})
        elif result.ok:
            print(f"ok: {result.checked} events verified")
        else:
            print(f"journal tampered: first bad event seq={result.first_bad_seq} ({reason})")
        if not result.ok:
            raise Exit(1)

    def journal_rebuild(self, force: bool = False) -> None:
        """Empty the read tables (sessions, execs, workspaces) and replay every event into them.

        Args:
          force: rebuild even when the hash chain is broken (the tables then show tampered events)
        """
        from sandkasten.store import audit

        pid = self.daemon_pid()
        if pid is not None:
            raise Failed(f"unable to rebuild the journal: the daemon (pid {pid}) is running; "
                         "stop it first (sandkasten stop)")
        checked = self.journal(audit.verify)
        if not checked.ok and not force:
            raise Failed(f"unable to rebuild the journal: its hash chain breaks at event {checked.first_bad_seq} "
                         f"({_why(checked)}), so the read tables would show what was tampered with; see "
                         "sandkasten audit verify, or pass --force to rebuild anyway")
        count = self.journal(lambda j: j.rebuild())
        print(f"rebuilt the read tables from {count} event{'s' * (count != 1)}")

    def security(self, json: bool = False) -> None:
        """What confines a sandbox under this config: namespaces, privileges, seccomp profile.

        Args:
          json: print it as an object
        """
        from sandkasten.runtime import seccomp

        sec = self.cfg.security
        report = {
            "namespaces": ["mnt", "pid", "uts", "ipc", "net", "cgroup"],  # zygote.NAMESPACES
            "run_as": {"uid": sec.run_as_uid, "gid": sec.run_as_gid},
            "capabilities": "all dropped (bounding, effective, permitted, inheritable, ambient); securebits locked",
            "no_new_privs": True,
            "seccomp": {"profile": sec.seccomp, "denied": list(seccomp.denied(sec.seccomp))},
            "rootfs": "overlay over the image, pivot_root" + (", read-only" if self.cfg.defaults.readonly_rootfs
                                                              else ""),
            "network_default": self.cfg.defaults.network_mode,
        }
        if json:
            render.print_json(report)
            return
        render.table(["WHAT", "SETTING"], [
            ["namespaces", ", ".join(report["namespaces"])],
            ["commands run as", f"uid {sec.run_as_uid}, gid {sec.run_as_gid}"],
            ["capabilities", report["capabilities"]],
            ["no_new_privs", "on"],
            ["seccomp", f"{sec.seccomp}: {len(report['seccomp']['denied'])} syscalls refused"],
            ["root filesystem", report["rootfs"]],
            ["network (default)", report["network_default"]],
        ])
        if report["seccomp"]["denied"]:
            print("refused syscalls: " + " ".join(report["seccomp"]["denied"]))

    def doctor(self, json: bool = False) -> None:
        """Compare the journal with what exists on the host; exit 1 when they disagree.

        Args:
          json: print {checked, drift: [...]}
        """
        from sandkasten.doctor import find_drift
        from sandkasten.runtime.sandboxes import Runtime

        cfg = self.cfg
        from sandkasten import install

        runtime = Runtime.detect(cfg.data_dir, cgroup_parent=install.cgroup_parent(cfg))
        try:
            drift, checked = self.journal(lambda j: find_drift(j, runtime))
        finally:
            runtime.close()
        if json:
            render.print_json({"checked": checked, "drift": [d.__dict__ for d in drift]})
        elif not drift:
            print(f"ok: {checked} session{'s' * (checked != 1)} in the journal, no drift with the host")
        else:
            render.table(["SESSION", "JOURNAL", "KERNEL", "PROBLEM"],
                         [[d.session_id, d.journal, d.kernel, d.problem] for d in drift])
        if drift:
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
