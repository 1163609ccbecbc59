"""The daemon's side of background processes: start them, follow them to their exit, settle
them after a crash — journaling what it observed, as the executor does for execs.

Who runs this: the daemon, on its event loop. Work is keyed and idempotent through the
executor's `_once`: `ensure_started(sid, pid)` hands a journaled `process.requested` to the
runner (which starts an id at most once) and journals `process.started`; `ensure_watched`
holds a `proc_wait` on the runner until the process exits and journals `process.exited`.
The process itself belongs to the runner, never to the daemon: a daemon that dies leaves it
running, and the next daemon's `resume_all` watches it again (or journals the exit it missed,
with the real exit code the runner kept). Only a process whose fate cannot be known — its
runner died with it — becomes `process.lost`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sandkasten.domain import commands as c
from sandkasten.errors import ProcessExited, SandboxError, SandboxGone, SessionBusy, SandkastenError

log = logging.getLogger("sandkasten.processes")
ACTOR = "executor"


def exited_command(process_id: str, result: dict) -> c.RecordProcessExited:
    """`process.exited` from the runner's record of the exit."""
    started, ended = result.get("started_at"), result.get("exited_at")
    return c.RecordProcessExited(
        process_id=process_id, exit_code=result.get("exit_code"), signal=result.get("signal"),
        timed_out=bool(result.get("timed_out")), stdout_bytes=int(result.get("stdout_bytes") or 0),
        stderr_bytes=int(result.get("stderr_bytes") or 0), output_sha256=result.get("output_sha256") or "",
        dropped_bytes=int(result.get("dropped_bytes") or 0),
        duration_ms=round((ended - started) * 1000, 3) if started and ended else 0.0)


def _write_message(payload: dict) -> dict:
    return {"op": "proc_write", "seq": payload["seq"], "data_base64": payload.get("data_base64") or "",
            "eof": payload["kind"] == "eof"}


class ProcessControl:
    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.journal = executor.journal
        self.runtime = executor.runtime
        self.cfg = executor.cfg

    def ensure_started(self, sid: str, process_id: str) -> asyncio.Future:
        return self.executor._once(f"pstart:{process_id}", lambda: self._start(sid, process_id))

    def ensure_watched(self, sid: str, process_id: str) -> asyncio.Future:
        return self.executor._once(f"pwait:{process_id}", lambda: self._watch(sid, process_id))

    async def _record(self, sid: str, *commands: Any) -> bool:
        try:
            await self.journal.execute_all(sid, list(commands), actor=ACTOR)
            return True
        except SandkastenError as e:   # the session moved on (destroyed): the journal already says how
            log.info("not recorded for %s: %s", sid, e.message)
            return False

    async def _start(self, sid: str, process_id: str) -> None:
        row = await self.journal.process(process_id)
        if row is None or row["status"] != "requested":
            return
        msg = {"op": "proc_start", "id": process_id, "cmd": row["cmd"], "cwd": row["cwd"], "env": row["env"],
               "timeout_ms": row["timeout_ms"], "max_log_bytes": self.cfg.processes.max_log_bytes,
               "pty": {"rows": row["pty_rows"], "cols": row["pty_cols"]} if row["pty_rows"] else None}
        try:
            reply = await self.runtime.aprocess(sid, msg)
        except SandboxGone as e:
            await self._record(sid, c.RecordProcessLost(process_id=process_id, reason=e.message))
            raise
        if not reply.get("ok"):
            reason = f"unable to start process {process_id}: {reply.get('message')}"
            await self._record(sid, c.RecordProcessLost(process_id=process_id, reason=reason))
            raise SandboxError(reason, process_id=process_id)
        state = reply.get("state")
        if state == "running":
            await self._record(sid, c.RecordProcessStarted(process_id=process_id, pid=reply["pid"]))
            self.ensure_watched(sid, process_id)
        elif state == "exited":   # it ended before we asked again (or could not start at all)
            await self._record(sid, c.RecordProcessStarted(process_id=process_id, pid=reply.get("pid") or 0),
                               exited_command(process_id, reply))
        else:
            await self._record(sid, c.RecordProcessLost(process_id=process_id,
                                                        reason=reply.get("reason") or f"runner says {state}"))

    async def _watch(self, sid: str, process_id: str) -> None:
        """Wait on the runner for the exit; a runner gone away is the reconciler's to settle.
        First, what was typed while no daemon was there to deliver it reaches the process."""
        try:
            await self.deliver_pending(sid, process_id)
        except SandkastenError as e:
            log.warning("unable to deliver pending input to process %s: %s", process_id, e.message)
        try:
            reply = await self.runtime.aprocess(sid, {"op": "proc_wait", "id": process_id}, timeout=None)
        except SandboxGone:
            return
        if reply.get("state") == "exited":
            await self._record(sid, exited_command(process_id, reply))
        elif reply.get("state") in ("unknown", "lost"):
            await self._record(sid, c.RecordProcessLost(
                process_id=process_id, reason="the sandbox's runner has no record of it (restarted?)"))

    async def resume_all(self, sessions: set[str] | None = None) -> int:
        """After a start: hand every pending process back to its runner (of `sessions` only,
        when given: a cluster host resumes the processes of its own sessions). The count resumed."""
        rows = [r for r in await self.journal.pending_processes() if sessions is None or r["session_id"] in sessions]
        for row in rows:
            if row["status"] == "requested":
                self.ensure_started(row["session_id"], row["id"])
            else:
                self.ensure_watched(row["session_id"], row["id"])
        return len(rows)

    async def settle(self, sid: str) -> None:
        """The sandbox died: each pending process exited before it (its result is on disk) or is lost."""
        state = await self.journal.session_state(sid)
        for process_id in (list(state.processes) if state is not None else []):
            result = await asyncio.to_thread(self.runtime.read_process_result, sid, process_id)
            if result is not None and result.get("state") == "exited":
                await self._record(sid, exited_command(process_id, result))
            else:
                await self._record(sid, c.RecordProcessLost(process_id=process_id,
                                                            reason="the sandbox died while it ran"))

    # ------------------------------------------------------------------ input (intent journaled by the caller)
    async def deliver(self, sid: str, process_id: str, inputs: list) -> None:
        """Hand journaled stdin/EOF inputs (`process.input` events, numbered by `seq`) to the
        runner, which takes each number once and in order. Should the runner miss an earlier one
        (the daemon died between journaling and sending it), everything missing is re-sent
        from the journal first."""
        for event in inputs:
            if "seq" not in event.payload:
                continue
            reply = await self.send(sid, process_id, _write_message(event.payload))
            if reply.get("error") == "gap":
                await self.deliver_pending(sid, process_id)
                return

    async def deliver_pending(self, sid: str, process_id: str) -> int:
        """Re-send the journaled inputs the runner has not taken yet; how many were sent."""
        from sandkasten.domain import events as ev

        status = await self.runtime.aprocess(sid, {"op": "proc_status", "id": process_id})
        if status.get("state") != "running":
            return 0
        taken = int(status.get("input_seq") or 0)
        missing, after = [], 0
        while True:
            batch = await self.journal.events(after_seq=after, stream_id=sid, limit=5_000, types=[ev.PROCESS_INPUT])
            if not batch:
                break
            missing += [e for e in batch if e.payload["process_id"] == process_id and e.payload.get("seq", 0) > taken]
            after = batch[-1].seq
        for event in missing:
            if event.payload["kind"] == "stdin" and event.payload.get("data_base64") is None:
                log.warning("input %s of process %s was journaled without its bytes (audit.record_input: false) "
                            "and never reached it", event.payload["seq"], process_id)
            await self.send(sid, process_id, _write_message(event.payload))
        return len(missing)

    async def send(self, sid: str, process_id: str, msg: dict) -> dict:
        """One op on a running process; PROCESS_EXITED when the runner says it is gone."""
        reply = await self.runtime.aprocess(sid, {**msg, "id": process_id})
        if reply.get("ok"):
            return reply
        error = reply.get("error")
        if error == "gap":   # see `deliver`
            return reply
        taken = (reply.get("result") or {}).get("input_seq") or 0
        if error == "exited" and msg.get("seq") and taken >= msg["seq"]:
            return {"ok": True, "duplicate": True}   # it took this input (sent twice at once), then ended
        if error in ("exited", "unknown"):
            if error == "exited" and reply.get("result"):
                self.ensure_watched(sid, process_id)   # its exit is journaled by the watch
            raise ProcessExited(f"unable to {msg['op'].removeprefix('proc_')} process {process_id}: "
                                f"it has exited", process_id=process_id)
        if error == "stdin_full":
            raise SessionBusy(reply.get("message") or f"process {process_id} is not reading its stdin",
                              process_id=process_id)
        raise SandboxError(f"unable to {msg['op'].removeprefix('proc_')} process {process_id}: "
                           f"{reply.get('message')}", process_id=process_id)
