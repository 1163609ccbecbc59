"""The `sandkasten` command line itself: usage texts, option parsing Fire cannot do
(`exec`'s free-form command, a global `--config`, refusing unknown flags before anything
runs), and the errors that end a command with an exit code. Pure: no journal, no daemon."""

from __future__ import annotations

import inspect
import os
import re
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable

from sandkasten.config import yes_no


USAGE = """\
sandkasten: event-sourced Linux sandboxes for AI agents

usage:
  sandkasten [--config PATH]                     run the daemon in the foreground
  sandkasten daemon [-d|--detach]                run the daemon (in the background with -d)
  sandkasten stop                                stop the background daemon (sandboxes keep running)

  sandkasten ps [--all] [--json]                 list live sessions (--all: also ended ones)
  sandkasten ps SESSION [--processes] [--all] [--json]
                                                 the session's processes beside its shell
  sandkasten attach SESSION PROCESS [--detach-key ctrl-]]
                                                 this terminal becomes the process's terminal
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
  sandkasten journal rebuild [--force]           rebuild the read tables from the events (daemon stopped;
                                                 refused on a broken hash chain unless --force)
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
FIRE_COMMANDS = ("ps", "logs", "attach", "create", "rm", "version", "doctor", "security", *GROUPS)
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
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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


def wants_help(args: list[str]) -> bool:
    """`-h`/`--help` before any `--`: show the command's help (Fire renders it from the docstring)."""
    for a in args:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def show_help(commands: dict[str, Any], path: list[str], name: str) -> None:
    """One command's help, rendered by Fire from its docstring, on stdout (Fire writes it to
    stderr, so `sandkasten logs --help | less` showed nothing) and without Fire's "INFO:
    Showing help with the command" line (it leaves that out for `-- --help`)."""
    import contextlib
    import sys

    import fire

    os.environ["PAGER"] = "cat"  # Fire pages its help through less on a tty
    with contextlib.redirect_stderr(sys.stdout):
        try:
            fire.Fire(commands, command=[*path, "--", "--help"], name=name)
        except fire.core.FireExit:
            pass


def call_args(fn: Callable[..., Any], args: list[str],
              positional: tuple[str, ...] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """The arguments to call FN with, read strictly from ARGS before anything runs.

    Fire binds a stray word to the next free parameter, flags included, and complains about
    leftovers only after the call: `ps extra` was `ps --all`, `logs --follow s-1` took the id as
    the value of --follow, `imgbuilder delete x --dry-run` deleted x and then failed. Here:
    a bool parameter is a flag that takes no value (`--json`, `--nojson`, `--json=false`, `-j`),
    any other takes one (`--image x`, `--image=x`); words fill POSITIONAL (default: the
    parameters without a default) and then a `*args`; anything else is a usage error. Values
    are read like Fire reads them (`120` is an int).
    """
    from fire.parser import DefaultParseValue

    sig = inspect.signature(fn).parameters.values()
    params = {p.name: p for p in sig if p.kind is not p.VAR_POSITIONAL}
    varargs = any(p.kind is p.VAR_POSITIONAL for p in sig)
    if positional is None:
        positional = tuple(n for n, p in params.items() if p.default is p.empty)
    known = ", ".join("--" + n for n in params)
    words: list[Any] = []
    kwargs: dict[str, Any] = {}
    i, only_words = 0, False
    while i < len(args):
        a = args[i]
        i += 1
        if only_words or a == "-" or not a.startswith("-") or re.fullmatch(r"-\d+(\.\d*)?", a):
            words.append(DefaultParseValue(a))
            continue
        if a == "--":
            only_words = True
            continue
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            name = name.replace("-", "_")
        else:
            matches = [n for n in params if len(a) == 2 and n.startswith(a[1])]
            if len(matches) != 1:
                raise Usage(f"unknown option {a}" + (f" (known: {known})" if known else ""))
            name, eq, value = matches[0], "", ""
        negated = params.get(name[2:]) if name.startswith("no") and name not in params else None
        if negated is not None and isinstance(negated.default, bool) and not eq:
            kwargs[negated.name] = False
            continue
        if name not in params:
            raise Usage(f"unknown option {a.partition('=')[0]}" + (f" (known: {known})" if known else ""))
        if isinstance(params[name].default, bool):
            if eq and yes_no(value) is None:
                raise Usage(f"--{name} takes no value, or true or false (got {value!r})")
            kwargs[name] = not eq or bool(yes_no(value))
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                raise Usage(f"--{name} needs a value")
            value, i = args[i], i + 1
        kwargs[name] = DefaultParseValue(value)
    free = [n for n in positional if n not in kwargs]
    for name, word in zip(free, words, strict=False):   # fewer words than parameters, or more (the rest)
        kwargs[name] = word
    rest = words[len(free):]
    if rest and not varargs:
        raise Usage(f"unexpected argument {str(rest[0])!r}")
    missing = [n.upper() for n in free[len(words):] if params[n].default is params[n].empty]
    if missing:
        raise Usage(f"missing {' and '.join(missing)}")
    return rest, kwargs
