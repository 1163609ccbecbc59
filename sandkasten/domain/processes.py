"""Processes beside the shell as pure functions: the deciders and the state they keep.

A process lives in its session's stream: requested -> running (process.started) -> exited |
lost (requested -> lost too). While it runs, every byte typed into it and every resize and
signal is a `process.input` event — the audit shows what was typed into a terminal, not only
that one existed. The session state keeps only the processes not yet ended (so a bound on
live processes is a length); facts about ended ones (is this id taken? which process used
this idempotency key?) come from the store as `PriorExecs`, as for execs. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.errors import IllegalTransition, InvalidRequest, ProcessExited, TooManyProcesses
from sandkasten.schema.vocabulary import ProcessStatus

# the statuses are defined once, in sandkasten.schema.vocabulary (PROCESS_ENDED too)
PROCESS_REQUESTED = ProcessStatus.REQUESTED
PROCESS_RUNNING = ProcessStatus.RUNNING
PROCESS_EXITED = ProcessStatus.EXITED
PROCESS_LOST = ProcessStatus.LOST
INPUT_KINDS = frozenset({"stdin", "eof", "resize", "signal"})
DELIVERED_IN_ORDER = frozenset({"stdin", "eof"})   # numbered (`seq`): the runner takes each once
KEEP_KEYS = 64   # idempotency keys of recent inputs a process remembers


@dataclass(frozen=True)
class ProcessState:
    status: str  # "requested" | "running" (ended processes leave the state)
    pty: bool = False
    idempotency_key: str | None = None
    inputs: int = 0                  # stdin and eof inputs so far (the last one's `seq`)
    input_keys: tuple[str, ...] = ()  # Idempotency-Keys of the latest inputs


def request(state: Any, cmd: c.RequestProcess, prior: Any, verb: str,
            duplicate_key: type[IllegalTransition]) -> list[ev.NewEvent]:
    sid = state.session_id
    key = cmd.idempotency_key
    if key is not None:
        owner = prior.key_exec_id or next((p for p, x in state.processes.items() if x.idempotency_key == key), None)
        if owner is not None:
            raise duplicate_key(f"unable to {verb} {sid}: idempotency key {key!r} already used by process {owner}",
                                exec_id=owner, session_id=sid)
    if prior.exec_id_taken or cmd.process_id in state.processes:
        raise IllegalTransition(f"unable to {verb} {sid}: process id {cmd.process_id} already exists")
    if len(state.processes) >= cmd.max_live:
        raise TooManyProcesses(f"unable to {verb} {sid}: {len(state.processes)} processes are running, the "
                               f"most a session may have (processes.max_per_session); end one first",
                               session_id=sid, limit=cmd.max_live)
    payload = {"process_id": cmd.process_id, "cmd": cmd.cmd, "cwd": cmd.cwd, "env": dict(cmd.env),
               "pty": {"rows": cmd.pty[0], "cols": cmd.pty[1]} if cmd.pty else None,
               "timeout_ms": cmd.timeout_ms, "idempotency_key": key}
    return [ev.NewEvent(ev.PROCESS_REQUESTED, payload)]


def _pending(state: Any, process_id: str, verb: str) -> ProcessState:
    found = state.processes.get(process_id)
    if found is None:
        raise ProcessExited(f"unable to {verb} {state.session_id}: process {process_id} is not running",
                            session_id=state.session_id, process_id=process_id)
    return found


def started(state: Any, cmd: c.RecordProcessStarted, prior: Any, verb: str) -> list[ev.NewEvent]:
    if _pending(state, cmd.process_id, verb).status != PROCESS_REQUESTED:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: process {cmd.process_id} already started")
    return [ev.NewEvent(ev.PROCESS_STARTED, {"process_id": cmd.process_id, "pid": cmd.pid})]


def input_(state: Any, cmd: c.RecordProcessInput, prior: Any, verb: str,
           duplicate_key: type[IllegalTransition] = IllegalTransition) -> list[ev.NewEvent]:
    proc = _pending(state, cmd.process_id, verb)
    if cmd.idempotency_key is not None and cmd.idempotency_key in proc.input_keys:
        raise duplicate_key(f"unable to {verb} {state.session_id}: input with idempotency key "
                            f"{cmd.idempotency_key!r} already sent to process {cmd.process_id}",
                            exec_id=cmd.process_id, session_id=state.session_id)
    if cmd.kind not in INPUT_KINDS:
        raise ValueError(f"unknown process input kind {cmd.kind!r}")
    if cmd.kind == "resize" and not proc.pty:
        raise InvalidRequest(f"unable to {verb} {state.session_id}: process {cmd.process_id} has no terminal "
                             f"to resize (start it with pty)", process_id=cmd.process_id)
    payload: dict[str, Any] = {"process_id": cmd.process_id, "kind": cmd.kind}
    if cmd.kind in DELIVERED_IN_ORDER:
        payload["seq"] = proc.inputs + 1
    if cmd.idempotency_key is not None:
        payload["idempotency_key"] = cmd.idempotency_key
    if cmd.kind == "stdin":
        payload.update(size=cmd.size, sha256=cmd.sha256)
        if cmd.data_base64 is not None:
            payload["data_base64"] = cmd.data_base64
    elif cmd.kind == "resize":
        payload.update(rows=cmd.rows, cols=cmd.cols)
    elif cmd.kind == "signal":
        payload["signal"] = cmd.signal
    return [ev.NewEvent(ev.PROCESS_INPUT, payload)]


def exited(state: Any, cmd: c.RecordProcessExited, prior: Any, verb: str) -> list[ev.NewEvent]:
    _pending(state, cmd.process_id, verb)
    payload = {"process_id": cmd.process_id, "exit_code": cmd.exit_code, "signal": cmd.signal,
               "timed_out": cmd.timed_out, "stdout_bytes": cmd.stdout_bytes, "stderr_bytes": cmd.stderr_bytes,
               "output_sha256": cmd.output_sha256, "dropped_bytes": cmd.dropped_bytes,
               "duration_ms": cmd.duration_ms}
    return [ev.NewEvent(ev.PROCESS_EXITED, payload)]


def lost(state: Any, cmd: c.RecordProcessLost, prior: Any, verb: str) -> list[ev.NewEvent]:
    _pending(state, cmd.process_id, verb)
    return [ev.NewEvent(ev.PROCESS_LOST, {"process_id": cmd.process_id, "reason": cmd.reason})]


def lose_all(state: Any, reason: str) -> list[ev.NewEvent]:
    """The session (or its sandbox) ended: nothing can report on its processes any more."""
    return [ev.NewEvent(ev.PROCESS_LOST, {"process_id": pid, "reason": reason}) for pid in state.processes]


def evolve(processes: dict[str, ProcessState], event: Any) -> dict[str, ProcessState]:
    """The live processes after one process event."""
    p = event.payload
    pid = p["process_id"]
    if event.type == ev.PROCESS_REQUESTED:
        return {**processes, pid: ProcessState(PROCESS_REQUESTED, bool(p.get("pty")), p.get("idempotency_key"))}
    if event.type == ev.PROCESS_STARTED:
        return {**processes, pid: replace(processes[pid], status=PROCESS_RUNNING)}
    if event.type == ev.PROCESS_INPUT and pid in processes:
        proc = processes[pid]
        key = p.get("idempotency_key")
        return {**processes, pid: replace(proc, inputs=p.get("seq") or proc.inputs,
                                          input_keys=(*proc.input_keys, key)[-KEEP_KEYS:] if key else proc.input_keys)}
    if event.type in (ev.PROCESS_EXITED, ev.PROCESS_LOST):
        return {k: v for k, v in processes.items() if k != pid}
    return processes   # process.input changes nothing decide needs
