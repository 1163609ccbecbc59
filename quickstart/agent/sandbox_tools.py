"""What the three quickstart agents share: the connection to Sandkasten, the four sandbox
tools, and the agent itself.

The tools run in one Sandkasten session: a persistent shell (so `cd`, variables and background
processes carry over between calls) and its /workspace. Anything the sandbox answers with an
error — a refused path, a missing file, a timeout, the daemon being away — comes back to the
model as text it can act on; it never crashes the agent.

Environment: OPENAI_API_KEY (and OPENAI_BASE_URL for any OpenAI-compatible endpoint),
SANDKASTEN_URL (default http://127.0.0.1:8080), SANDKASTEN_API_KEY.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn

import openai
from agents import Agent, FunctionTool, function_tool, set_tracing_disabled
from agents.exceptions import AgentsException

from sandkasten.client import AsyncClient, AsyncSandbox, InvalidURL, SandkastenError, SessionEnded

MAX_TOOL_OUTPUT = 20_000  # characters of command output handed to the model
EXIT_RETRY_S = 10.0  # how long the final destroy waits for a daemon that is away (restarting)
MODEL_ERRORS = (openai.OpenAIError, AgentsException)  # a failed run: reported, never a traceback
INSTRUCTIONS = """You are a careful coding agent. You have a real Linux sandbox (Debian with
python3, no network) and these tools: run_command (a persistent bash-like shell: cd and
variables persist), write_file, read_file and list_files. Files live in /workspace, where the
shell starts; paths for the file tools are relative to /workspace. Do the work in the sandbox,
check results by running them, and answer briefly with what you did and what came out."""


def configure_model_access() -> None:
    """The OpenAI Agents SDK reads OPENAI_API_KEY and OPENAI_BASE_URL itself. With a custom
    endpoint its traces (sent to OpenAI's platform) would only fail, so tracing is off then."""
    if os.environ.get("OPENAI_BASE_URL"):
        set_tracing_disabled(True)
    if not os.environ.get("OPENAI_API_KEY"):
        sys.exit("error: set OPENAI_API_KEY (and OPENAI_BASE_URL for an OpenAI-compatible endpoint)")


@asynccontextmanager
async def open_sandbox(workspace_id: str | None = None, image: str | None = None) -> AsyncIterator[AsyncSandbox]:
    """A fresh Sandkasten session, destroyed on exit. With a `workspace_id`, /workspace is that
    persistent workspace: its files outlive the session."""
    try:
        async with AsyncClient(retry_for=2.0) as probe:  # fail fast when nothing listens
            await probe.health()
    except InvalidURL as e:
        sys.exit(f"error: {e.message}")
    except SandkastenError as e:
        sys.exit(f"error: {e.message}\n(start it: .venv/bin/sandkasten daemon -d --config "
                 "quickstart/sandkasten.yaml, or set SANDKASTEN_URL)")
    async with AsyncClient() as client:
        try:
            sandbox = await client.session(image, workspace_id=workspace_id).start()
        except SandkastenError as e:
            sys.exit(f"error: unable to create a sandbox session: {e}")
        try:
            yield sandbox
        finally:
            await close_sandbox(sandbox)


async def close_sandbox(sandbox: AsyncSandbox) -> None:
    """Destroy the session on the way out; a daemon that is gone by then gets a short wait and
    a warning, not a traceback over the agent's answer."""
    try:
        async with AsyncClient(retry_for=EXIT_RETRY_S) as client:
            await AsyncSandbox(client, sandbox.info).destroy()
    except SandkastenError as e:
        print(f"warning: unable to destroy sandbox session {sandbox.id}: {e}\n(it ends when its TTL runs "
              f"out; or remove it: .venv/bin/sandkasten rm {sandbox.id})", file=sys.stderr)


def run_main(main: Callable[[], Awaitable[int | None]]) -> NoReturn:
    """`asyncio.run` for the agents' `main`: Ctrl-C ends with a line, not a traceback (the
    sandbox session is destroyed on the way out, as on any exit)."""
    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)


async def read_line(prompt: Callable[..., str], *args: Any) -> str:
    """`prompt(*args)` (e.g. `input`) without blocking the event loop, in a daemon thread:
    `asyncio.to_thread` would use the loop's executor, whose thread keeps the process alive
    after Ctrl-C until Enter is pressed."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not answer.done():
            answer.set_result(value) if ok else answer.set_exception(value)

    def read() -> None:
        try:
            value = prompt(*args)
        except BaseException as e:  # noqa: BLE001 - EOFError and the like belong to the caller
            loop.call_soon_threadsafe(deliver, False, e)
        else:
            loop.call_soon_threadsafe(deliver, True, value)

    threading.Thread(target=read, name="read-line", daemon=True).start()
    return await answer


def model_failure(e: Exception) -> str:
    """One line for a failed agent run: the model unreachable or refusing, or the SDK giving up."""
    where = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if isinstance(e, openai.APIConnectionError):
        return f"unable to reach the model at {where}: {e} (check OPENAI_BASE_URL)"
    if isinstance(e, openai.APIStatusError):
        return f"the model endpoint {where} refused the request: HTTP {e.status_code}: {e.message} " \
               "(check OPENAI_API_KEY, OPENAI_DEFAULT_MODEL)"
    return f"{type(e).__name__}: {e}"


def _problem(e: SandkastenError) -> str:
    hint = (" (this sandbox session is over, e.g. its TTL ran out: no tool works any more; tell the user to "
            "restart the agent, a --workspace keeps its files)" if isinstance(e, SessionEnded) else "")
    return f"error: {e.code}: {e.message}{hint}"


def _clip(text: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT:
        return text
    return text[:MAX_TOOL_OUTPUT] + f"\n[... {len(text) - MAX_TOOL_OUTPUT} more characters cut ...]"


def sandbox_tools(sandbox: AsyncSandbox) -> list[FunctionTool]:
    """The four tools, bound to one sandbox session."""

    @function_tool
    async def run_command(command: str, timeout_seconds: int = 60) -> str:
        """Run a shell command in the sandbox's persistent shell and return its exit code,
        working directory and output (stdout and stderr interleaved).

        Args:
            command: the shell command line, e.g. "python3 primes.py".
            timeout_seconds: stop the command after this many seconds (the shell survives).
        """
        try:
            r = await sandbox.exec(command, timeout_ms=max(1, timeout_seconds) * 1000)
        except SandkastenError as e:
            return _problem(e)
        notes = (" (timed out)" if r.timed_out else "") + (" (output truncated)" if r.truncated else "")
        return f"exit_code: {r.exit_code}{notes}\ncwd: {r.cwd}\noutput:\n{_clip(r.output)}"

    @function_tool
    async def write_file(path: str, content: str) -> str:
        """Create or replace a text file in /workspace (parent directories are created).

        Args:
            path: path relative to /workspace, e.g. "src/main.py".
            content: the complete new content of the file.
        """
        try:
            entry = await sandbox.write(path, content)
        except SandkastenError as e:
            return _problem(e)
        return f"wrote {entry.path} ({entry.size} bytes)"

    @function_tool
    async def read_file(path: str) -> str:
        """Read a text file from /workspace.

        Args:
            path: path relative to /workspace.
        """
        try:
            f = await sandbox.read(path, max_bytes=MAX_TOOL_OUTPUT)
        except SandkastenError as e:
            return _problem(e)
        return f.text + (f"\n[... file is {f.size} bytes, cut ...]" if f.truncated else "")

    @function_tool
    async def list_files(path: str = "") -> str:
        """List a directory of /workspace: one line per entry with type, size and path.

        Args:
            path: directory relative to /workspace ("" for /workspace itself).
        """
        try:
            entries = await sandbox.list_files("" if path.strip() in ("", ".", "./") else path.strip())
        except SandkastenError as e:
            return _problem(e)
        if not entries:
            return "(empty directory)"
        return "\n".join(f"{e.type:7} {e.size:>9}  {e.path}" for e in entries)

    return [run_command, write_file, read_file, list_files]


def build_agent(sandbox: AsyncSandbox, name: str = "Sandkasten coding agent") -> Agent:
    return Agent(name=name, instructions=INSTRUCTIONS, tools=sandbox_tools(sandbox))
