"""The `sandkasten` command line itself: usage texts, option parsing Fire cannot do
(`exec`'s free-form command, a global `--config`, refusing unknown flags before anything
runs), and the errors that end a command with an exit code. Pure: no journal, no daemon."""

from __future__ import annotations

import inspect
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable


USAGE = """\
sandkasten: event-sourced Linux sandboxes for AI agents

usage:
  sandkasten [--config PATH]                     run the daemon in the foreground
  sandkasten daemon [-d|--detach]                run the daemon (in the background with -d)
  sandkasten stop                                stop the background daemon (sandboxes keep running)

  sandkasten ps [--all] [--json]                 list live sessions (--all: also ended ones)
  sandkasten logs SESSION [--follow] [--json]    replay every command of a session with its output
  sandkasten create [--image NAME] [--ttl SECONDS] [--workspace ID] [--json]
                                                 request a session and print its id
  sandkasten exec SESSION CMD [--timeout MS] [--json]
  sandkasten exec SESSION [--timeout MS] -- CMD WORDS...
                                                 run CMD in the session's shell; exits with its code
  sandkasten rm SESSION... [--json]              destroy sessions
  sandkasten audit export [--format jsonl|csv] [--since 1h|2d|ISO-TIME] [--session ID] [--output FILE]
                                                 every command ever run (who, when, cmd, exit code, sha256)
  sandkasten audit verify [--json]               recompute the journal's hash chain
  sandkasten journal rebuild                     rebuild the read tables from the events (daemon stopped)
  sandkasten doctor [--json]                     drift between the journal and the kernel (exit 1 if any)
  sandkasten security [--json]                   what confines a sandbox: namespaces, privileges, seccomp
  sandkasten version [--json]

every command takes --config PATH (default: $SANDKASTEN_CONFIG, else ./sandkasten.yaml if it
exists, else built-in defaults; SANDKASTEN_<KEY> variables override single keys).
`sandkasten COMMAND --help` describes one command. Without a daemon, create/exec/rm are queued
in the journal and carried out when the daemon starts (exec then exits 3).
"""

EXEC_USAGE = """\
usage: sandkasten exec SESSION CMD [--timeout MS] [--json]
       sandkasten exec SESSION [--timeout MS] [--json] -- CMD WORDS...

Runs CMD in the session's persistent shell (cd, variables and functions carry over), prints its
stdout and stderr and exits with its exit code. Several words are joined with spaces (like ssh);
after `--` nothing is read as an option. Exit 3: no daemon is running (the command stays queued).
"""

DAEMON_USAGE = """\
usage: sandkasten daemon [-d|--detach] [--config PATH]
       sandkasten stop [--config PATH]

`daemon` runs in the foreground until SIGINT/SIGTERM; with -d it starts in the background
(pid and log under DATA_DIR/run/) and returns once the daemon answers. Stopping the daemon
never stops sandboxes: the next start adopts them.
"""

GROUPS = {"audit": ("export", "verify"), "journal": ("rebuild",)}
FIRE_COMMANDS = ("ps", "logs", "create", "rm", "version", "doctor", "security", *GROUPS)
COMMANDS = ("daemon", "stop", "exec", *FIRE_COMMANDS)
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Failed(Exception):
    """A one-line error for the user (exit 1)."""


class Usage(Exception):
    """The command line itself is wrong (exit 2)."""


class Exit(Exception):
    """Leave with this code; whatever needed saying was said."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------- values from Fire

def text(value: Any, flag: str) -> str:
    """Fire turns `--image 123` into an int and a bare `--image` into True; names are strings."""
    if isinstance(value, bool):
        raise Usage(f"{flag} needs a value")
    return str(value)


def parse_since(value: Any, now: datetime) -> datetime | None:
    """`--since 1h` (s, m, h, d, w before now) or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    raw = text(value, "--since").strip()
    m = _RELATIVE.match(raw)
    if m:
        try:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except (OverflowError, ValueError):
            raise Usage(f"invalid --since {raw!r}: that is before the year 1") from None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise Usage(f"invalid --since {raw!r}: expected an age like 30m, 1h, 2d or an ISO time "
                    "like 2024-05-01T12:00:00Z") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def group_usage(group: str) -> str:
    """The lines of USAGE about one command group (`sandkasten audit --help`)."""
    lines, keep = [], False
    for line in USAGE.splitlines(keepends=True):
        if line.startswith("  sandkasten "):
            keep = line.startswith(f"  sandkasten {group} ")
        elif not line.startswith("    "):
            keep = False
        if keep:
            lines.append(line)
    return (f"usage: sandkasten {group} {'|'.join(GROUPS[group])} [OPTIONS]\n\n" + "".join(lines) +
            f"\n`sandkasten {group} {GROUPS[group][0]} --help` describes one command.\n")


def config_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("SANDKASTEN_CONFIG"):
        return os.environ["SANDKASTEN_CONFIG"]
    return "sandkasten.yaml" if Path("sandkasten.yaml").is_file() else None


# ---------------------------------------------------------------- argument handling

def split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """Take the global --config out of the arguments (anywhere before a `--`)."""
    path, out, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out.extend(args[i:])
            break
        if a == "--config":
            if i + 1 >= len(args):
                raise Usage("--config needs a PATH")
            path, i = args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return path, out


def exec_args(args: list[str]) -> tuple[str, str, str | None, bool] | None:
    """SESSION, CMD, --timeout, --json from `exec`'s own arguments; None for --help.

    Fire would turn "123" into an int and treat `--` as its own separator, so exec is parsed
    here: options before the first command word or after it, everything after `--` verbatim.
    """
    sid, words, timeout, as_json, i = None, [], None, False, 0
    while i < len(args):
        a = args[i]
        if a == "--":
            words.extend(args[i + 1:])
            break
        if a in ("-h", "--help"):
            return None
        if a == "--json":
            as_json = True
        elif a in ("--timeout", "--timeout_ms", "--timeout-ms"):
            if i + 1 >= len(args):
                raise Usage(f"{a} needs a value in milliseconds")
            timeout, i = args[i + 1], i + 1
        elif a.startswith(("--timeout=", "--timeout_ms=", "--timeout-ms=")):
            timeout = a.split("=", 1)[1]
        elif a.startswith("-") and not words and (sid is None or a.startswith("--")):
            raise Usage(f"exec: unknown option {a} (put the command after `--`)")
        elif sid is None:
            sid = a
        else:
            words.append(a)
        i += 1
    if sid is None:
        raise Usage("exec needs a SESSION and a command")
    cmd = words[0] if len(words) == 1 else " ".join(words)
    if not cmd.strip():
        raise Usage("exec needs a command: sandkasten exec SESSION CMD")
    return sid, cmd, timeout, as_json


def check_flags(fn: Callable[..., Any], args: list[str]) -> None:
    """Refuse unknown flags before Fire runs anything: Fire would call the command first and
    complain about the leftover flag afterwards (`rm s-1 --jsno` would remove s-1, then fail)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    names = {p.name for p in params} | {"help"}
    shorts = {p.name[0] for p in params} | {"h"}
    for a in args:
        if a == "--":
            return
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if name not in names and not (name.startswith("no") and name[2:] in names):
                raise Usage(f"unknown option --{name} (known: {', '.join('--' + n for n in sorted(names))})")
        elif re.fullmatch(r"-[A-Za-z]", a) and a[1] not in shorts:
            raise Usage(f"unknown option {a}")
