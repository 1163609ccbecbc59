"""`sandkasten`: run the daemon, and inspect or drive sessions through the journal.

Who runs this: an operator or a script on the daemon's host. Every command but `daemon`
and `stop` opens the journal itself (the SQLite file under data_dir), so `ps`, `logs` and
`audit` work with the daemon down. Commands that want something done (`create`, `exec`,
`rm`) append their intent through the same command handler the HTTP API uses, then wait for
the daemon to carry it out; with no daemon running the intent stays queued in the journal
and the next daemon start performs it. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable

from sandkasten.cli import render
from sandkasten import config as config_mod
from sandkasten.cli.admin import AdminCommands
from sandkasten.cli.args import (
    COMMANDS,
    DAEMON_USAGE,
    EXEC_USAGE,
    GROUPS,
    USAGE,
    Exit,
    Failed,
    Usage,
    call_args,
    config_path,
    exec_args,
    group_usage,
    show_help,
    split_config,
    text,
    wants_help,
)
from sandkasten.errors import ConfigError, SandkastenError, SessionNotFound
from sandkasten.schema.vocabulary import EXEC_ENDED
from sandkasten.schema.vocabulary import SESSION_ENDED as ENDED
from sandkasten.service import Caller, Polling, Sessions
from sandkasten.views import session_view

T = TypeVar("T")
NO_DAEMON_EXIT = 3
POSITIONAL = {"ps": ("session",)}   # words a command takes beyond its required ones
WAIT_S = 30.0
CLI = Caller("cli")

# ---------------------------------------------------------------- the commands

class Cli(AdminCommands):
    """The commands, sharing one lazily loaded config (`version` and `--help` need none)."""

    def __init__(self, config: str | None) -> None:
        self.config_path = config_path(config)
        self._cfg: config_mod.Config | None = None
        self._remote: str | None = None  # a cluster: the address of the host the session runs on

    @property
    def cfg(self) -> config_mod.Config:
        if self._cfg is None:
            self._cfg = config_mod.load(self.config_path)
        return self._cfg

    def journal(self, work: Callable[[Any], Awaitable[T]], create: bool = False) -> T:
        """Open the journal, run `work(journal)` on a fresh event loop, close it. Only a command
        that records something new (`create`) makes a journal where there is none: reading one
        that does not exist means the config names the wrong data_dir, not an empty history."""
        from sandkasten.store.journal import Journal

        cfg = self.cfg
        target = cfg.journal_target
        if not create and not cfg.shared_journal and isinstance(target, Path) and not target.exists():
            raise Failed(f"unable to open the journal {target}: no such file (neither the daemon nor "
                         f"`sandkasten create` has used data_dir {cfg.data_dir}; is --config right?)")

        async def run() -> T:
            journal = await Journal.open(target, cfg.journal.durability)
            try:
                return await work(journal)
            finally:
                await journal.close()

        return asyncio.run(run())

    def daemon_pid(self) -> int | None:
        from sandkasten import daemon

        return daemon.running_pid(self.cfg)

    # -- daemon ------------------------------------------------------------------------

    def serve(self) -> int:
        from sandkasten import daemon

        return daemon.serve(self.cfg)

    def detach(self) -> int:
        from sandkasten import daemon

        cfg = self.cfg
        return daemon.start_background(cfg, str(Path(self.config_path).absolute()) if self.config_path else None)

    def stop(self) -> int:
        from sandkasten import daemon

        return daemon.stop_background(self.cfg)

    # -- reading -----------------------------------------------------------------------

    def ps(self, session: Any = None, all: bool = False, json: bool = False,  # noqa: A002 - the flag is --all
           processes: bool = False) -> None:
        """List sessions like `docker ps`: id, image, status, created, expires, execs, cwd, workspace;
        with SESSION (or --processes), that session's processes beside the shell.

        Args:
          session: list this session's processes (id, pid, status, terminal, output, input, command)
          all: also list ended sessions (destroyed, failed) and idle pool sandboxes; with SESSION,
            also processes that have ended
          json: print a JSON array (the HTTP API's session or process objects)
          processes: list processes (needs SESSION)
        """
        if processes or session is not None:
            if session is None:
                raise Usage("ps --processes needs a SESSION")
            self._ps_processes(text(session, "SESSION"), bool(all), bool(json))
            return
        rows = self.journal(lambda j: j.sessions(include_ended=bool(all), include_pool=bool(all)))
        if json:
            render.print_json([session_view(r) for r in rows])
        else:
            render.sessions_table(rows, datetime.now(UTC), bool(all))

    def _ps_processes(self, sid: str, include_ended: bool, as_json: bool) -> None:
        from sandkasten.views import process_view

        async def work(journal) -> list[dict]:
            if await journal.session(sid) is None:
                raise SessionNotFound(f"unable to list processes of session {sid!r}: no such session")
            return await journal.processes(sid, include_ended=include_ended)

        rows = self.journal(work)
        if as_json:
            render.print_json([process_view(r) for r in rows])
        else:
            render.processes_table(rows, datetime.now(UTC), include_ended)

    def logs(self, session: str, follow: bool = False, json: bool = False) -> None:
        """Replay every command of SESSION in order: a header (time, exec id, $ cmd, exit code,
        duration, cwd, status), then its output; in between, processes started beside the shell
        (`&`), every input sent to them (`<`, resizes, signals) and how they ended, with their output.

        Args:
          session: session id
          follow: keep printing commands, a running one's output as it is written, until the
            session ends or Ctrl-C
          json: print a JSON array of exec objects (with --follow: one object per line)
        """
        sid = text(session, "SESSION")
        try:
            self.journal(lambda j: self._replay(j, sid, bool(follow), bool(json)))
        except KeyboardInterrupt:
            if not follow:
                raise

    async def _replay(self, journal, sid: str, follow: bool, as_json: bool) -> None:
        if await journal.session(sid) is None:
            raise SessionNotFound(f"unable to show logs of session {sid!r}: no such session")
        shown: set[str] = set()
        collected: list[dict] = []
        seen_seq = -1
        self._remote = await _owner_address(journal, self.cfg, sid)  # a cluster: output on another host
        process_seq = 0   # process events up to here are shown
        while True:
            seq = await journal.last_seq()
            if seq != seen_seq:
                seen_seq = seq
                ended = (await journal.session(sid))["status"] in ENDED
                for row in await self._timeline(journal, sid, process_seq):
                    if not isinstance(row, dict):   # a process event
                        process_seq = row.seq
                        self._show_process_event(sid, row, as_json, follow, collected)
                        continue
                    if row["id"] in shown:
                        continue
                    if follow and not ended and row["status"] not in EXEC_ENDED:
                        if as_json:
                            break  # one finished object per line; later execs wait for this one
                        row = await self._stream(journal, sid, row)
                        shown.add(row["id"])
                        continue
                    shown.add(row["id"])
                    output = self.output(sid, row, self.cfg.defaults.max_output_bytes)
                    if not as_json:
                        render.write_exec(row, output)
                    elif follow:
                        render.print_json_line(render.exec_json(row, output))
                    else:
                        collected.append(render.exec_json(row, output))
                if not follow or ended:
                    break
            await asyncio.sleep(0.2)
        if as_json and not follow:
            render.print_json(collected)

    async def _timeline(self, journal, sid: str, after_seq: int) -> list:
        """Exec rows and process events (after `after_seq`) of a session, in the order they happened."""
        from sandkasten.domain import events as ev

        execs = await journal.execs(sid)
        procs = await journal.events(after_seq=after_seq, stream_id=sid, limit=100_000,
                                     types=ev.PROCESS_EVENT_TYPES)
        items = [(r["requested_at"], 0, r) for r in execs] + [(e.created_at, 1, e) for e in procs]
        return [item for _, _, item in sorted(items, key=lambda t: (t[0], t[1]))]

    def _show_process_event(self, sid: str, event, as_json: bool, follow: bool, collected: list) -> None:
        from runner import protocol
        from sandkasten.runtime.layout import Layout

        output = None
        if event.type in ("process.exited", "process.lost"):
            try:
                path = Layout(self.cfg.data_dir).of(sid).logs / f"{event.payload['process_id']}.log"
                output = protocol.read_output(path, self.cfg.defaults.max_output_bytes)[2]
            except (FileNotFoundError, SandkastenError):
                output = b""
        if as_json:
            item = {"event": event.type, "at": event.created_at, "actor": event.actor, **event.payload}
            if output is not None:
                item["output"] = output.decode("utf-8", "replace")
            if follow:
                render.print_json_line(item)
            else:
                collected.append(item)
            return
        print(render.process_event_line(event), flush=True)
        if output:
            sys.stdout.buffer.write(output if output.endswith(b"\n") else output + b"\n")
            sys.stdout.buffer.flush()

    async def _stream(self, journal, sid: str, row: dict) -> dict:
        """A running exec as it runs: its header, its output from the same feed as the SSE
        stream (the runner's log), then how it ended. Returns the final row."""
        from sandkasten.files import exec_feed
        from sandkasten.runtime.layout import Layout

        # a daemon is about to pick up a requested exec: it is not "waiting for the daemon"
        shown = {**row, "status": "running"} if self.daemon_pid() is not None else row
        print(render.exec_header(shown), flush=True)
        final = row

        async def settled() -> bool:
            nonlocal final
            final = await journal.exec(row["id"])
            return final["status"] in EXEC_ENDED

        path = Layout(self.cfg.data_dir).of(sid).logs / f"{row['id']}.log"
        tail = b""
        async for frame in exec_feed.follow(path, 0, settled):
            if not isinstance(frame, exec_feed.Frame):
                continue
            sys.stdout.buffer.write(frame.data)
            sys.stdout.buffer.flush()
            tail = frame.data[-1:] or tail
        if tail and tail != b"\n":
            sys.stdout.buffer.write(b"\n")
        print(f"({render.exec_outcome(final)})" if final["status"] != "lost"
              else f"(lost: {final['lost_reason'] or 'unknown reason'})", flush=True)
        return final

    def output(self, sid: str, row: dict, limit: int | None) -> render.Output | None:
        """The exec's output from data_dir/logs/<sid>/<exec_id>.log (written by the runner)."""
        from runner import protocol
        from sandkasten.runtime.layout import Layout

        if row["status"] == "requested":
            return None
        remote_address = self._remote
        if remote_address:  # the session runs on another host of the cluster
            from sandkasten.cluster import remote

            return render.Output(*remote.exec_output(self.cfg, remote_address, sid, row["id"]))
        try:
            path = Layout(self.cfg.data_dir).of(sid).logs / f"{row['id']}.log"
            return render.Output(*protocol.read_output(path, limit))
        except FileNotFoundError:
            return render.Output()
        except SandkastenError:  # an id that cannot name a file: nothing was written for it
            return render.Output()

    def attach(self, session: str, process: str, detach_key: str = "ctrl-]") -> None:
        """Attach this terminal to a process running beside the session's shell: its output so far,
        then live; what you type goes to it (journaled); resizing this terminal resizes its PTY.
        The detach key leaves it running. Exits with the process's exit code when it ends.

        Args:
          session: session id
          process: process id (sandkasten ps SESSION lists them)
          detach_key: ctrl-] (default), ctrl-\\, ctrl-q or ctrl-p
        """
        from sandkasten.cli.attach import attach

        raise Exit(attach(self.cfg, text(session, "SESSION"), text(process, "PROCESS"),
                          text(detach_key, "--detach-key")))

    # -- writing -----------------------------------------------------------------------

    def create(self, image: str | None = None, ttl: int | None = None, workspace: str | None = None,
               json: bool = False) -> None:
        """Request a session and print its id once the daemon has started it.

        Args:
          image: image name (default: the config's default_image)
          ttl: lifetime in seconds (default: session_ttl_seconds)
          workspace: persistent workspace id to mount at /workspace
          json: print the session object
        """
        from sandkasten import intake
        from sandkasten.images.store import ImageStore

        cfg = self.cfg
        body: dict[str, Any] = {}
        if image is not None:
            body["image"] = text(image, "--image")
        if ttl is not None:
            body["ttl_seconds"] = ttl
        if workspace is not None:
            body["workspace_id"] = text(workspace, "--workspace")
        command = intake.session_command(cfg, ImageStore(cfg.images_dir), body)
        pid = self.daemon_pid()

        async def work(journal) -> dict:
            return await self.sessions(journal).create(command, CLI)

        row = self.journal(work, create=True)
        sid = row["id"]
        if json:
            render.print_json(session_view(row))
        else:
            print(sid, flush=True)
        if pid is None:
            print(f"sandkasten: no daemon is running; session {sid} is queued and is created when the "
                  "daemon starts", file=sys.stderr)
        elif row["status"] == "failed":
            raise Failed(f"unable to create session {sid}: {row['end_reason'] or 'the sandbox failed to start'}")
        elif row["status"] != "running":
            raise Failed(f"session {sid} is still {row['status']} after {WAIT_S:.0f}s; "
                         f"see {self.cfg.run_dir / 'daemon.log'}")

    def exec_(self, session: str, cmd: str, timeout: Any = None, as_json: bool = False) -> int:
        """Run `cmd` in the session's shell; called directly by main (Fire would mangle CMD)."""
        from sandkasten import intake

        body: dict[str, Any] = {"cmd": cmd}
        if timeout is not None:
            body["timeout_ms"] = int(timeout) if re.fullmatch(r"[-+]?\d+", str(timeout)) else timeout
        intake.exec_command(self.cfg, body)   # a bad request is refused before the journal is opened
        pid = self.daemon_pid()
        exec_id = ""

        async def work(journal) -> dict | None:
            nonlocal exec_id
            row = await journal.session(session)
            if row is None:
                raise SessionNotFound(f"unable to exec in session {session!r}: no such session")
            if row["status"] == "requested" and pid is None:
                raise Failed(f"unable to exec in session {session}: its sandbox has not started yet, and no "
                             "daemon is running to start it (sandkasten daemon -d)")
            self._remote = await _owner_address(journal, self.cfg, session)
            sessions = self.sessions(journal, remote=bool(self._remote))
            submitted = await sessions.submit_exec(session, lambda: body, None, CLI)
            exec_id = submitted.exec_id
            if pid is None and not self._remote:
                return None
            row, _ = await sessions.settled_exec(session, submitted)
            return row

        row = self.journal(work)
        if row is None or row["status"] not in EXEC_ENDED:
            why = "no daemon is running" if row is None else "the daemon stopped"
            print(f"sandkasten: {why}; exec {exec_id} is queued in session {session} and runs "
                  "when the daemon starts", file=sys.stderr)
            return NO_DAEMON_EXIT
        if row["status"] == "lost":
            raise Failed(f"exec {row['id']} in session {session} was lost: {row['lost_reason']}")
        output = self.output(session, row, None) or render.Output()
        if as_json:
            render.print_json(render.exec_json(row, output))
        else:
            sys.stdout.buffer.write(output.stdout)
            sys.stdout.buffer.flush()
            sys.stderr.buffer.write(output.stderr)
            sys.stderr.buffer.flush()
            if row["timed_out"]:
                print(f"sandkasten: exec {row['id']} timed out after {row['timeout_ms']} ms", file=sys.stderr)
        return int(row["exit_code"] or 0)

    def rm(self, *sessions: str, json: bool = False) -> None:
        """Destroy sessions (their exec logs stay on disk and in `sandkasten logs`).

        Args:
          sessions: one or more session ids
          json: print a JSON array of {id, status, error}
        """
        if not sessions:
            raise Usage("rm needs one or more SESSION ids")
        sids = [text(s, "SESSION") for s in sessions]
        pid = self.daemon_pid()

        async def work(journal) -> list[dict]:
            service = self.sessions(journal)
            results: list[dict[str, Any]] = []
            for sid in sids:   # all requested first, then waited for: they are destroyed side by side
                try:
                    await service.request_destroy(sid, "cli", CLI, verb="remove")
                    results.append({"id": sid, "status": "destroying", "error": None})
                except SandkastenError as e:
                    results.append({"id": sid, "status": None, "error": e.message})
            for result in results:
                if result["error"] is None:
                    await service.waiter.destroyed(result["id"])
                    result["status"] = (await journal.session(result["id"]))["status"]
            return results

        results = self.journal(work)
        if json:
            render.print_json(results)
        for r in results:
            if r["error"] is not None:
                print(f"sandkasten: {r['error']}", file=sys.stderr)
                continue
            if not json:
                print(r["id"])
            if r["status"] != "destroyed":
                why = "no daemon is running" if pid is None else f"still {r['status']} after {WAIT_S:.0f}s"
                print(f"sandkasten: {r['id']}: destroy requested; {why}, the daemon finishes it", file=sys.stderr)
        if any(r["error"] is not None for r in results):
            raise Exit(1)

    def sessions(self, journal, remote: bool = False) -> Sessions:
        """The service, waiting by polling the journal while a daemon runs (or, in a cluster, the
        host the session runs on): with none, an intent stays queued for the next daemon."""
        return Sessions(self.cfg, journal, Polling(journal, lambda: remote or self.daemon_pid() is not None, WAIT_S))

    def fire_commands(self) -> dict[str, Any]:
        return {"ps": self.ps, "logs": self.logs, "attach": self.attach, "create": self.create, "rm": self.rm,
                "audit": {"export": self.audit_export, "verify": self.audit_verify},
                "journal": {"rebuild": self.journal_rebuild}, "version": self.version, "doctor": self.doctor,
                "security": self.security}


def dispatch(cli: Cli, args: list[str]) -> int:
    command = args[0] if args else "daemon"
    rest = args[1:]
    if command in ("daemon", "stop"):
        if any(a in ("-h", "--help") for a in rest):
            print(DAEMON_USAGE, end="")
            return 0
        if command == "stop" and not rest:
            return cli.stop()
        if command == "daemon" and rest in ([], ["-d"], ["--detach"]):
            return cli.detach() if rest else cli.serve()
        raise Usage(f"{command}: unexpected argument(s) {' '.join(rest)}")
    if command == "exec":
        parsed = exec_args(rest)
        if parsed is None:
            print(EXEC_USAGE, end="")
            return 0
        return cli.exec_(*parsed)
    if command in GROUPS and rest and rest[0] in ("-h", "--help"):
        print(group_usage(command), end="")
        return 0
    if command in GROUPS and (not rest or rest[0] not in GROUPS[command]):
        raise Usage(f"{command} needs one of: {', '.join(GROUPS[command])}")
    target = cli.fire_commands()[command]
    fn, fn_args = (target[rest[0]], rest[1:]) if isinstance(target, dict) else (target, rest)
    path = args[:len(args) - len(fn_args)]
    if wants_help(fn_args):
        show_help(cli.fire_commands(), path, "sandkasten")
        return 0
    try:
        words, kwargs = call_args(fn, fn_args, POSITIONAL.get(fn.__name__))
    except Usage as e:
        raise Usage(f"{' '.join(path)}: {e}") from None
    fn(*words, **kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        config, args = split_config(args)
        if args and args[0] in ("-h", "--help", "help"):
            print(USAGE, end="")
            return 0
        if args and args[0] not in COMMANDS:
            raise Usage(f"unknown command {args[0]!r} (sandkasten --help lists them)")
        return dispatch(Cli(config), args)
    except Usage as e:
        print(f"sandkasten: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"sandkasten: {e.message}", file=sys.stderr)
        return 2
    except Exit as e:
        return e.code
    except (Failed, SandkastenError) as e:
        print(f"sandkasten: {getattr(e, 'message', e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sandkasten logs s-… | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        print(f"sandkasten: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sandkasten: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


async def _owner_address(journal, cfg, sid: str) -> str | None:
    if not cfg.shared_journal:
        return None
    from sandkasten.cluster import remote

    return await remote.owner_address(journal, cfg, sid)
