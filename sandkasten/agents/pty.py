"""exec_command's processes and write_stdin on Sandkasten's process API
(`/v1/sessions/{id}/processes`): a process the model starts runs in the sandbox under the
runner, beside the shell, with or without a PTY; its output is logged by the runner as it comes.

So a process outlives the agent that started it. The number the model sees for a process is
derived from its Sandkasten id (`p-...`), not handed out by this object: an agent resumed in a
new process after a crash finds `session_id=4711` again by listing the sandbox's processes,
with no state carried over, and reads its output from the start (what came while no agent was
listening included).

Used as a mixin of `SandkastenSandboxSession` (which provides `_connection`, `sandbox_id`,
`_prepare_exec_command`). `supports_pty()` is decided once the session started: by whether the
daemon serves the process API."""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import signal as signals
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agents.sandbox.errors import PtySessionNotFoundError
from agents.sandbox.session.pty_types import (
    PTY_PROCESS_ID_MAX_EXCLUSIVE,
    PTY_PROCESS_ID_MIN,
    PtyExecUpdate,
    clamp_pty_yield_time_ms,
    resolve_pty_write_yield_time_ms,
    truncate_text_by_tokens,
)
from agents.sandbox.types import User

from sandkasten.agents.faults import transport_error
from sandkasten.client import errors as client_errors
from sandkasten.schema.vocabulary import PROCESS_ENDED, ProcessStatus

if TYPE_CHECKING:
    from sandkasten.agents.connection import Connection
    from sandkasten.agents.state import SandkastenSandboxSessionState

PTY_SIZE = (24, 80)
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.25


def model_id(process_id: str) -> int:
    """The process number the model sees: a function of the Sandkasten process id alone."""
    span = PTY_PROCESS_ID_MAX_EXCLUSIVE - PTY_PROCESS_ID_MIN
    return PTY_PROCESS_ID_MIN + int(hashlib.sha256(process_id.encode()).hexdigest()[:12], 16) % span


def exit_status(exit_code: int | None, signal: str | None) -> int | None:
    """The exit code, or 128 + the number of the signal that ended it (as a shell says)."""
    if exit_code is not None or not signal:
        return exit_code
    try:
        return 128 + signals.Signals[signal if signal.startswith("SIG") else "SIG" + signal].value
    except KeyError:
        return None


@dataclass
class _Process:
    process_id: str
    offset: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ProcessTable:
    if TYPE_CHECKING:   # what the session this is mixed into provides (see the module's doc)
        state: SandkastenSandboxSessionState

        @property
        def sandbox_id(self) -> str: ...
        def _connection(self) -> Connection: ...
        def _prepare_exec_command(self, *command: str | Path, shell: bool | list[str],
                                  user: str | User | None) -> list[str]: ...

    def __init__(self) -> None:
        self._processes: dict[int, _Process] = {}
        self._process_api = False

    def supports_pty(self) -> bool:
        return self._process_api

    async def _probe_processes(self) -> None:
        try:
            await self._connection().api.list_processes(self.sandbox_id)
        except client_errors.SandkastenError:
            self._process_api = False      # a daemon without the process API: one-shot exec only
        else:
            self._process_api = True

    async def pty_exec_start(self, *command: str | Path, timeout: float | None = None,
                             shell: bool | list[str] = True, user: str | User | None = None, tty: bool = False,
                             yield_time_s: float | None = None, max_output_tokens: int | None = None
                             ) -> PtyExecUpdate:
        line = shlex.join(self._prepare_exec_command(*command, shell=shell, user=user))
        timeout_ms = None if timeout is None else max(1, int(timeout * 1000))
        try:
            started = await self._connection().api.start_process(
                self.sandbox_id, line, cwd=self.state.manifest.root, pty=PTY_SIZE if tty else None,
                timeout_ms=timeout_ms)
        except client_errors.SandkastenError as e:
            raise transport_error(command, e, f"start the process in Sandkasten session {self.sandbox_id}") from e
        number = model_id(started.process_id)
        self._processes[number] = _Process(started.process_id)
        yield_ms = clamp_pty_yield_time_ms(10_000 if yield_time_s is None else int(yield_time_s * 1000))
        return await self._collect(number, yield_ms, max_output_tokens)

    async def pty_write_stdin(self, *, session_id: int, chars: str, yield_time_s: float | None = None,
                              max_output_tokens: int | None = None) -> PtyExecUpdate:
        process = await self._find(session_id)
        if chars:
            try:
                await self._connection().api.write_stdin(self.sandbox_id, process.process_id, chars)
            except client_errors.ProcessExited:
                pass                       # it ended meanwhile: its end is reported below
            except client_errors.SandkastenError as e:
                raise transport_error(("write_stdin", str(session_id)), e, f"write to process {session_id}") from e
        yield_ms = resolve_pty_write_yield_time_ms(
            yield_time_ms=250 if yield_time_s is None else int(yield_time_s * 1000), input_empty=chars == "")
        return await self._collect(session_id, yield_ms, max_output_tokens)

    async def pty_terminate_all(self) -> None:
        """Kill the processes this session started or touched (the sandbox keeps the rest)."""
        processes = list(self._processes.values())
        self._processes.clear()
        for process in processes:
            try:
                await self._connection().api.kill_process(self.sandbox_id, process.process_id)
            except client_errors.SandkastenError:
                pass                       # already gone, or the session ended

    async def _find(self, number: int) -> _Process:
        known = self._processes.get(number)
        if known is not None:
            return known
        if self._process_api:             # started by an agent process before this one
            for listed in await self._connection().api.list_processes(self.sandbox_id, include_ended=True):
                if model_id(listed.process_id) == number:
                    self._processes[number] = _Process(listed.process_id)
                    return self._processes[number]
        raise PtySessionNotFoundError(session_id=number)

    async def _collect(self, number: int, yield_ms: int, max_output_tokens: int | None) -> PtyExecUpdate:
        """Output until the process ends or `yield_ms` passed; the process number while it runs."""
        process = self._processes[number]
        api = self._connection().api
        deadline = time.monotonic() + yield_ms / 1000
        output = bytearray()
        pause = POLL_FIRST_S
        while True:
            try:
                answer = await api.process_output(self.sandbox_id, process.process_id, offset=process.offset)
            except client_errors.SandkastenError as e:
                raise transport_error(("process", process.process_id), e, f"read the output of process {number}") from e
            output += answer.output
            process.offset = answer.next_offset
            status = answer.status
            if status in PROCESS_ENDED and answer.eof:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)
        process.last_used = time.monotonic()
        text = output.decode("utf-8", "replace")
        if status == ProcessStatus.LOST:
            text += "\n(the process was lost: its sandbox ended or its fate is unknown)"
        text, original_tokens = truncate_text_by_tokens(text, max_output_tokens)
        if status not in PROCESS_ENDED:
            return PtyExecUpdate(process_id=number, output=text.encode(), exit_code=None,
                                 original_token_count=original_tokens)
        self._processes.pop(number, None)
        return PtyExecUpdate(process_id=None, output=text.encode(),
                             exit_code=exit_status(answer.exit_code, answer.signal),
                             original_token_count=original_tokens)
