"""Audit trail: every command ever run, read from the events (never from read tables).

`sandkasten audit export` writes one row per exec — who (actor), when (requested_at),
session, exec id, command, cwd, exit code, duration, output hash, status, kind "exec" — as
JSONL or CSV, in order with one row per process started beside the shell (kind "process", its
id in `exec_id`), one per input sent to a process (kind "input": the bytes typed, in `input`,
unless the daemon runs with `audit.record_input: false`; a resize, a signal or EOF in `cmd`;
their sha256 in `output_sha256`), so an auditor sees what was typed into a terminal, and one
per file written or deleted through the file API (kind "file": cmd "write /workspace/x (N
bytes)", the content's sha256, status written|deleted; session is the session or
"ws:<workspace>"). `sandkasten audit verify` recomputes the hash chain. Read-only; safe with
the daemon up.
"""

from __future__ import annotations

import base64
import csv
import json
from datetime import datetime, UTC
from typing import Any, TextIO
from collections.abc import Mapping

from sandkasten.domain import events as ev
from sandkasten.domain.session import EXEC_FINISHED, EXEC_LOST, EXEC_REQUESTED, EXEC_RUNNING
from sandkasten.errors import InvalidRequest
from sandkasten.store.journal import Journal, VerifyResult

FIELDS = (
    "actor", "requested_at", "session", "exec_id", "cmd", "cwd", "exit_code", "duration_ms",
    "output_sha256", "status", "kind", "input",
)
AUDITED_TYPES = ev.EXEC_EVENT_TYPES | ev.PROCESS_EVENT_TYPES | ev.FILE_EVENT_TYPES
FORMATS = ("jsonl", "csv")
_PAGE = 5_000


async def export(
    journal: Journal,
    fmt: str = "jsonl",
    since: datetime | None = None,
    session: str | None = None,
    out: TextIO | None = None,
    *,
    until: datetime | None = None,
    actor: str | None = None,
) -> int:
    """Write one row per exec requested at or after `since` (and before `until`, in `session`,
    by `actor`, each if given) to `out`.

    Returns the number of rows written. Rows come in the order the execs were requested.
    """
    if fmt not in FORMATS:
        raise InvalidRequest(f"unable to export audit trail: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if out is None:
        raise InvalidRequest("unable to export audit trail: no output stream")
    since_iso = _iso(since) if since is not None else None
    rows = await collect(journal, since_iso, session, until_iso=_iso(until) if until is not None else None,
                         actor=actor)
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return len(rows)


async def collect(journal: Journal, since_iso: str | None, session: str | None, *,
                  until_iso: str | None = None, actor: str | None = None) -> list[dict[str, Any]]:
    """Fold the exec events into one dict per exec (in request order)."""
    rows: dict[str, dict[str, Any]] = {}
    after = 0
    while True:
        batch = await journal.events(after_seq=after, stream_id=session, limit=_PAGE, types=AUDITED_TYPES)
        if not batch:
            return [row for row in rows.values()
                    if (actor is None or row["actor"] == actor)
                    and (until_iso is None or row["requested_at"] < until_iso)]
        for event in batch:
            _fold(rows, event, since_iso)
        after = batch[-1].seq


def _fold(rows: dict[str, dict[str, Any]], event: ev.RecordedEvent, since_iso: str | None) -> None:
    if event.type in ev.PROCESS_EVENT_TYPES:
        _fold_process(rows, event, since_iso)
        return
    p = event.payload
    if event.type in ev.FILE_EVENT_TYPES:  # a change through the file API: one row of its own
        if since_iso is None or event.created_at >= since_iso:
            what = (f"write {p['path']} ({p.get('size', 0)} bytes)" if event.type == ev.FILE_WRITTEN
                    else f"delete {p['path']}" + (" (recursive)" if p.get("recursive") else ""))
            rows[f"file:{event.seq}"] = {
                "actor": event.actor, "requested_at": event.created_at, "session": event.stream_id,
                "exec_id": None, "cmd": what, "cwd": None, "exit_code": None, "duration_ms": None,
                "output_sha256": p.get("sha256"), "status": "written" if event.type == ev.FILE_WRITTEN else "deleted",
                "kind": "file", "input": None,
            }
        return
    if event.type not in ev.EXEC_EVENT_TYPES:
        return
    if event.type == ev.EXEC_REQUESTED:
        if since_iso is not None and event.created_at < since_iso:
            return
        rows[p["exec_id"]] = {
            "actor": event.actor, "requested_at": event.created_at, "session": event.stream_id,
            "exec_id": p["exec_id"], "cmd": p["cmd"], "cwd": None, "exit_code": None, "duration_ms": None,
            "output_sha256": None, "status": EXEC_REQUESTED, "kind": "exec", "input": None,
        }
        return
    row = rows.get(p["exec_id"])
    if row is None:  # requested before `since`
        return
    if event.type == ev.EXEC_STARTED:
        row["status"] = EXEC_RUNNING
    elif event.type == ev.EXEC_FINISHED:
        row.update(status=EXEC_FINISHED, cwd=p.get("cwd"), exit_code=p.get("exit_code"),
                   duration_ms=p.get("duration_ms"), output_sha256=p.get("output_sha256"))
    elif event.type == ev.EXEC_LOST:
        row["status"] = EXEC_LOST


def _fold_process(rows: dict[str, dict[str, Any]], event: ev.RecordedEvent, since_iso: str | None) -> None:
    p = event.payload
    pid = p["process_id"]
    if event.type == ev.PROCESS_REQUESTED:
        if since_iso is not None and event.created_at < since_iso:
            return
        rows[pid] = {
            "actor": event.actor, "requested_at": event.created_at, "session": event.stream_id, "exec_id": pid,
            "cmd": p["cmd"], "cwd": p.get("cwd"), "exit_code": None, "duration_ms": None, "output_sha256": None,
            "status": "requested", "kind": "process", "input": None,
        }
        return
    row = rows.get(pid)
    # started before `since`: its inputs after `since` still count
    if row is None and (event.type != ev.PROCESS_INPUT or (since_iso is not None and event.created_at < since_iso)):
        return
    if event.type == ev.PROCESS_INPUT:
        rows[f"{pid}#{event.seq}"] = {
            "actor": event.actor, "requested_at": event.created_at, "session": event.stream_id, "exec_id": pid,
            "cmd": _input_summary(p), "cwd": None, "exit_code": None, "duration_ms": None,
            "output_sha256": p.get("sha256"), "status": p["kind"], "kind": "input", "input": _typed(p),
        }
    elif row is None:
        return
    elif event.type == ev.PROCESS_STARTED:
        row["status"] = "running"
    elif event.type == ev.PROCESS_EXITED:
        row.update(status="exited", exit_code=p.get("exit_code") if p.get("signal") is None else p["signal"],
                   duration_ms=p.get("duration_ms"), output_sha256=p.get("output_sha256"))
    elif event.type == ev.PROCESS_LOST:
        row["status"] = "lost"


def _typed(p: Mapping[str, Any]) -> str | None:
    if p["kind"] != "stdin" or p.get("data_base64") is None:
        return None
    return base64.b64decode(p["data_base64"]).decode("utf-8", "replace")


def _input_summary(p: Mapping[str, Any]) -> str:
    kind = p["kind"]
    if kind == "stdin":
        return f"stdin {p.get('size', 0)} bytes" + ("" if p.get("data_base64") is not None else " (not recorded)")
    if kind == "resize":
        return f"resize {p.get('rows')}x{p.get('cols')}"
    if kind == "signal":
        return f"signal {p.get('signal')}"
    return "eof"


async def verify(journal: Journal) -> VerifyResult:
    """Recompute the whole hash chain (see Journal.verify)."""
    return await journal.verify()


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # a bare --since from the CLI means UTC
    return value.astimezone(UTC).isoformat(timespec="microseconds")
