"""What the `sandkasten` CLI prints: tables, JSON, and the replay format of `sandkasten logs`.

Who runs this: the CLI process, after it has read the journal. Tables are drawn with rich on a
terminal and as plain aligned text in a pipe (so `sandkasten ps | grep` and `awk` work);
`--json` prints the same rows as JSON. Apart from writing to stdout nothing here does I/O.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any
from collections.abc import Iterable, Sequence

from sandkasten.schema.vocabulary import SESSION_ENDED

SESSION_HEADER = ("SESSION ID", "IMAGE", "STATUS", "CREATED", "EXPIRES", "EXECS", "CWD", "WORKSPACE")


@dataclass(frozen=True)
class Output:
    """An exec's output as read from its log file; `cut` when reading stopped at the limit."""

    stdout: bytes = b""
    stderr: bytes = b""
    both: bytes = b""
    cut: bool = False


# ---------------------------------------------------------------- time

def parse_time(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        value = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def humanize(iso: str | None, now: datetime) -> str:
    """'2 minutes ago', 'in 29 minutes', 'just now' (like `docker ps`)."""
    when = parse_time(iso)
    if when is None:
        return "-"
    seconds = (now - when).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 2:
        return "just now"
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            n = int(seconds // size)
            text = f"{n} {unit}{'s' if n != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "just now"  # pragma: no cover


def stamp(iso: str | None) -> str:
    """A journal timestamp as UTC to the second: 2024-05-01T12:00:01Z."""
    when = parse_time(iso)
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    ms = round(ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    return f"{minutes}m{seconds:02d}s"


# ---------------------------------------------------------------- generic output

def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def print_json_line(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in [tuple(header), *rows]) for i in range(len(header))]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(*header, box=None, header_style="bold")
        for r in rows:
            t.add_row(*r)
        console = Console()
        # like `docker ps`: a narrow terminal wraps long lines rather than the table cutting ids
        console.width = max(console.width, sum(widths) + 2 * len(widths))
        console.print(t)
        return
    for r in [tuple(header), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


# ---------------------------------------------------------------- sessions

def session_cells(row: dict[str, Any], now: datetime) -> tuple[str, ...]:
    ended = row["status"] in SESSION_ENDED
    status = row["status"]
    if ended and row["ended_at"]:
        status = f"{status} {humanize(row['ended_at'], now)}"
    return (
        row["id"], row["image"], status, humanize(row["created_at"], now),
        "-" if ended else humanize(row["expires_at"], now), str(row["exec_count"]), row["cwd"],
        row["workspace_id"] or "-",
    )


def sessions_table(rows: list[dict[str, Any]], now: datetime, include_ended: bool) -> None:
    if not rows:
        print("no sessions" if include_ended else "no live sessions (sandkasten ps --all shows ended ones)")
        return
    table(SESSION_HEADER, [session_cells(r, now) for r in rows])


# ---------------------------------------------------------------- execs

def exec_json(row: dict[str, Any], output: Output | None = None) -> dict[str, Any]:
    """The same fields as the HTTP API's exec object (output fields when the output was read)."""
    out = {
        "exec_id": row["id"], "session_id": row["session_id"], "cmd": row["cmd"], "status": row["status"],
        "exit_code": row["exit_code"], "cwd": row["cwd"],
        "duration_ms": None if row["duration_ms"] is None else round(row["duration_ms"]),
        "timed_out": bool(row["timed_out"]), "truncated": bool(row["truncated"]),
        "requested_at": row["requested_at"], "finished_at": row["finished_at"], "actor": row["actor"],
        "stdout_bytes": row["stdout_bytes"], "stderr_bytes": row["stderr_bytes"],
        "output_sha256": row["output_sha256"], "lost_reason": row["lost_reason"],
    }
    if output is not None:
        out["truncated"] = out["truncated"] or output.cut
        out.update(output=output.both.decode("utf-8", "replace"), stdout=output.stdout.decode("utf-8", "replace"),
                   stderr=output.stderr.decode("utf-8", "replace"))
    return out


def exec_outcome(row: dict[str, Any]) -> str:
    status = row["status"]
    if status == "finished":
        parts = [f"exit {row['exit_code']}", duration(row["duration_ms"]), f"cwd {row['cwd']}"]
        if row["timed_out"]:
            parts.append("timed out")
        return ", ".join([*parts, "finished"])
    if status == "requested":
        return "requested, waiting for the daemon"
    return status


def exec_header(row: dict[str, Any]) -> str:
    """`[2024-05-01T12:00:01Z] x-… $ echo hi  (exit 0, 12 ms, cwd /tmp, finished)`;
    a multi-line command continues on `> ` lines, like a shell's prompt."""
    lines = row["cmd"].rstrip("\n").split("\n") or [""]
    text = f"$ {lines[0]}" + "".join(f"\n> {line}" for line in lines[1:])
    return f"[{stamp(row['requested_at'])}] {row['id']} {text}  ({exec_outcome(row)})"


def write_exec(row: dict[str, Any], output: Output | None) -> None:
    """One exec of `sandkasten logs`: the header, then its combined output as it was written."""
    print(exec_header(row))
    sys.stdout.flush()
    if output is not None and output.both:
        sys.stdout.buffer.write(output.both)
        if not output.both.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
    if row["status"] == "lost":
        print(f"(lost: {row['lost_reason'] or 'unknown reason'})")
    elif row["truncated"] or (output is not None and output.cut):
        print("(output truncated)")
    sys.stdout.flush()


# ---------------------------------------------------------------- processes

PROCESS_HEADER = ("PROCESS ID", "PID", "STATUS", "TTY", "STARTED", "OUTPUT", "INPUT", "COMMAND")


def process_status(row: dict[str, Any]) -> str:
    if row["status"] == "exited":
        return f"killed by {row['signal']}" if row["signal"] else f"exited {row['exit_code']}"
    return row["status"]


def process_cells(row: dict[str, Any], now: datetime) -> tuple[str, ...]:
    out = (row.get("stdout_bytes") or 0) + (row.get("stderr_bytes") or 0)
    cmd = row["cmd"].replace("\n", " ")
    return (row["id"], str(row["pid"] or "-"), process_status(row),
            f"{row['pty_rows']}x{row['pty_cols']}" if row["pty_rows"] else "-",
            humanize(row["started_at"] or row["requested_at"], now), f"{out} B" if row["status"] != "running" else "-",
            f"{row['input_bytes']} B", cmd if len(cmd) <= 60 else cmd[:57] + "...")


def processes_table(rows: list[dict[str, Any]], now: datetime, include_ended: bool) -> None:
    if not rows:
        print("no processes" if include_ended else "no running processes (--all shows ended ones)")
        return
    table(PROCESS_HEADER, [process_cells(r, now) for r in rows])


def process_event_line(event: Any) -> str:
    """One line of `sandkasten logs` for a process event (start, input, exit)."""
    p = event.payload
    pid = p["process_id"]
    head = f"[{stamp(event.created_at)}] {pid}"
    if event.type == "process.requested":
        tty = f"  (pty {p['pty']['rows']}x{p['pty']['cols']})" if p.get("pty") else ""
        return f"{head} & {p['cmd']}{tty}"
    if event.type == "process.started":
        return f"{head} started (pid {p['pid']})"
    if event.type == "process.input":
        kind = p["kind"]
        if kind == "stdin":
            if p.get("data_base64") is None:
                return f"{head} < ({p['size']} bytes, sha256 {p['sha256'][:12]}, not recorded)"
            import base64
            return f"{head} < {base64.b64decode(p['data_base64']).decode('utf-8', 'replace')!r}"
        if kind == "resize":
            return f"{head} resized to {p['rows']}x{p['cols']}"
        if kind == "signal":
            return f"{head} sent {p['signal']}"
        return f"{head} < EOF"
    if event.type == "process.exited":
        how = f"killed by {p['signal']}" if p.get("signal") else f"exit {p['exit_code']}"
        dropped = f", oldest {p['dropped_bytes']} bytes dropped" if p.get("dropped_bytes") else ""
        return f"{head} ended ({how}, {duration(p.get('duration_ms'))}{dropped})"
    return f"{head} lost ({p.get('reason')})"
