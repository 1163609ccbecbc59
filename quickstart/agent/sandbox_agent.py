"""A SandboxAgent (the OpenAI Agents SDK's own sandbox agent) in a Sandkasten sandbox: the
SDK's shell (`exec_command`, `write_stdin`) and file tools (`apply_patch`, `view_image`) run in
it, streamed in the same terminal UI as enhanced_agent.py, the conversation kept in SQLite.

It resumes after a crash. Kill it (or the daemon) in the middle of a request and start it
again: it reattaches to the very same sandbox — files, running processes, shell — and carries
on with the unfinished request under the same run id, which `sandkasten audit export` shows
on every command the run issued (actor `api:…/run:trace_…`).

    uv run sandbox_agent.py [--state-dir DIR] [--image IMAGE] [--workspace ID] [--keep] [PROMPT]

With a PROMPT: that request, then exit. Without: a prompt loop (/help, /history, /clear, /quit).
The sandbox is destroyed on a clean exit (unless --keep); after a crash it is kept for the
next start. State (conversation, sandbox, unfinished request) lives in --state-dir (default
./.sandbox_agent_state). Needs OPENAI_API_KEY, SANDKASTEN_URL, SANDKASTEN_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from agents import Runner, SQLiteSession, gen_trace_id, set_trace_processors, trace
from agents.run import RunConfig
from agents.sandbox import SandboxAgent, SandboxRunConfig
from rich.markup import escape
from rich.panel import Panel

from enhanced_agent import console, show_history, show_tool_output
from sandbox_tools import MODEL_ERRORS, model_failure, read_line, run_main
from sandkasten.agents import SandkastenSandboxClient, SandkastenSandboxClientOptions
from sandkasten.client import AsyncClient, InvalidURL, SandkastenError

INSTRUCTIONS = """You are a careful coding agent with a real Linux sandbox (Debian with python3,
no network). Work in /workspace: write code with apply_patch, run it with exec_command, check
the results, and answer briefly with what you did and what came out."""
HELP = """[bold]/help[/]     this help
[bold]/history[/]  the conversation so far (kept across restarts)
[bold]/clear[/]    forget the conversation (the sandbox stays)
[bold]/quit[/]     leave (Ctrl-D too): the sandbox is destroyed unless --keep
Kill the agent mid-request and start it again: it resumes in the same sandbox."""


class Ledger:
    """What a restart needs, next to the conversation (SQLite, one row each): the sandbox's
    serialized session state and the request in progress with its run (trace) id."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS sandbox_state (id INTEGER PRIMARY KEY CHECK (id = 1), "
                        "payload TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS pending_request (id INTEGER PRIMARY KEY CHECK (id = 1), "
                        "prompt TEXT NOT NULL, trace_id TEXT NOT NULL)")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def sandbox(self) -> dict | None:
        row = self.db.execute("SELECT payload FROM sandbox_state").fetchone()
        return json.loads(row[0]) if row else None

    def keep_sandbox(self, payload: dict) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO sandbox_state VALUES (1, ?)", (json.dumps(payload),))

    def forget_sandbox(self) -> None:
        with self.db:
            self.db.execute("DELETE FROM sandbox_state")

    def pending(self) -> tuple[str, str] | None:
        return self.db.execute("SELECT prompt, trace_id FROM pending_request").fetchone()

    def begin(self, prompt: str, trace_id: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO pending_request VALUES (1, ?, ?)", (prompt, trace_id))

    def finish(self) -> None:
        with self.db:
            self.db.execute("DELETE FROM pending_request")


def configure_model_access() -> None:
    """Traces keep their ids (they tag every sandbox command) but go nowhere with a custom
    endpoint: OpenAI's trace exporter would only fail there."""
    if os.environ.get("OPENAI_BASE_URL"):
        set_trace_processors([])
    if not os.environ.get("OPENAI_API_KEY"):
        sys.exit("error: set OPENAI_API_KEY (and OPENAI_BASE_URL for an OpenAI-compatible endpoint)")


async def check_daemon() -> None:
    try:
        async with AsyncClient(retry_for=2.0) as probe:   # fail fast when nothing listens
            await probe.health()
    except InvalidURL as e:
        sys.exit(f"error: {e.message}")
    except SandkastenError as e:
        sys.exit(f"error: {e.message}\n(start it: .venv/bin/sandkasten daemon -d --config "
                 "quickstart/sandkasten.yaml, or set SANDKASTEN_URL)")


async def open_sandbox(client: SandkastenSandboxClient, ledger: Ledger, options: SandkastenSandboxClientOptions):
    """The sandbox of the last run if the ledger has one (reattached, or replaced if it is gone),
    else a new one; its state is in the ledger before any request runs in it."""
    kept = ledger.sandbox()
    if kept is not None:
        session = await client.resume(client.deserialize_session_state(kept))
    else:
        session = await client.create(options=options)
    ledger.keep_sandbox(client.serialize_session_state(session.state))
    await session.start()
    ledger.keep_sandbox(client.serialize_session_state(session.state))
    return session, kept is not None


def show_call(raw: Any) -> None:
    """A tool call as a box: exec_command's arguments, or apply_patch's patch."""
    get = (lambda k: raw.get(k)) if isinstance(raw, dict) else (lambda k: getattr(raw, k, None))
    name = get("name") or "tool"
    if get("input") is not None:          # a custom tool call: its raw input (a patch)
        shown = str(get("input"))
    else:
        try:
            shown = "\n".join(f"{k}: {v}" for k, v in json.loads(get("arguments") or "{}").items())
        except ValueError:
            shown = str(get("arguments"))
    shown = shown if len(shown) <= 1500 else shown[:1500] + " …"
    console.print(Panel(escape(shown), title=f"⚙ {name}", title_align="left", border_style="yellow"))


async def run_request(agent, session, history: SQLiteSession, ledger: Ledger, prompt: str,
                      trace_id: str | None = None) -> None:
    """One request, streamed; `trace_id` given: the unfinished request of a run that died."""
    resuming = trace_id is not None
    trace_id = trace_id or gen_trace_id()
    ledger.begin(prompt, trace_id)
    items = await history.get_items()
    if resuming and _finished(items, prompt):
        ledger.finish()                    # it had answered; only the bookkeeping was missing
        return
    new_input: Any = [] if resuming and _asked(items, prompt) else prompt
    console.print(f"[dim]run {trace_id}[/]")
    speaking = False
    with trace("Sandkasten sandbox agent", trace_id=trace_id):
        result = Runner.run_streamed(agent, new_input, session=history, max_turns=30,
                                     run_config=RunConfig(sandbox=SandboxRunConfig(session=session)))
        async for event in result.stream_events():
            if event.type == "raw_response_event" and getattr(event.data, "type", "") == "response.output_text.delta":
                if not speaking:
                    console.print("[bold magenta]agent ›[/] ", end="")
                    speaking = True
                console.print(event.data.delta, end="", markup=False)
            elif event.type == "run_item_stream_event" and event.name in ("tool_called", "tool_output"):
                if speaking:
                    console.print()
                    speaking = False
                if event.name == "tool_called":
                    show_call(event.item.raw_item)
                else:
                    show_tool_output(event.item.output)
    if speaking:
        console.print()
    ledger.finish()


def _user_text(item: dict) -> str | None:
    if item.get("type", "message") != "message" or item.get("role") != "user":
        return None
    content = item.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _asked(items: list[dict], prompt: str) -> bool:
    """The conversation already holds this request (the run died after its first turn)."""
    users = [t for t in map(_user_text, items) if t is not None]
    return bool(users) and users[-1] == prompt


def _finished(items: list[dict], prompt: str) -> bool:
    return _asked(items, prompt) and items[-1].get("role") == "assistant" and items[-1].get("type", "message") == "message"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="one request, then exit (default: a prompt loop)")
    parser.add_argument("--state-dir", default=".sandbox_agent_state", help="conversation, sandbox, unfinished request")
    parser.add_argument("--image", help="sandbox image (default: the daemon's default_image)")
    parser.add_argument("--workspace", help="a persistent workspace id: /workspace outlives the sandbox")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox on exit (the next start reattaches)")
    args = parser.parse_args()
    configure_model_access()
    await check_daemon()
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    history = SQLiteSession("sandbox-agent", state_dir / "history.db")
    ledger = Ledger(state_dir / "history.db")
    agent = SandboxAgent(name="Sandkasten sandbox agent", instructions=INSTRUCTIONS)
    clean = False
    try:
        async with SandkastenSandboxClient() as client:
            options = SandkastenSandboxClientOptions(image=args.image, workspace_id=args.workspace)
            try:
                session, resumed = await open_sandbox(client, ledger, options)
            except SandkastenError as e:
                sys.exit(f"error: unable to open the sandbox: {e.message}")
            console.print(Panel(
                f"sandbox [bold]{session.state.sandbox_id}[/] ({'reattached' if resumed else 'new'}) · "
                f"history: {len(await history.get_items())} items · [bold]/help[/] for commands",
                title="Sandkasten sandbox agent (SandboxAgent)", border_style="green"))
            pending = ledger.pending()
            if pending is not None:
                console.print(f"[yellow]resuming the unfinished request[/] {escape(pending[0])!r}")
                await run_request(agent, session, history, ledger, pending[0], trace_id=pending[1])
            if args.prompt is not None:
                if pending is None or args.prompt != pending[0]:
                    await run_request(agent, session, history, ledger, args.prompt)
            else:
                await prompt_loop(agent, session, history, ledger)
            clean = True
            if not args.keep:
                await session.aclose()      # destroys the sandbox (a --workspace keeps its files)
                ledger.forget_sandbox()
    except MODEL_ERRORS as e:
        print(f"error: the agent run failed: {model_failure(e)}\n(the sandbox is kept: run again to resume)",
              file=sys.stderr)
        return 1
    finally:
        ledger.close()
        history.close()
    console.print("[green]bye[/]" + ("" if clean and not args.keep else " (sandbox kept: run again to resume)"))
    return 0


async def prompt_loop(agent, session, history: SQLiteSession, ledger: Ledger) -> None:
    while True:
        try:
            prompt = (await read_line(console.input, "\n[bold green]you ›[/] ")).strip()
        except EOFError:
            return
        if prompt in ("/quit", "/exit"):
            return
        if prompt == "/help":
            console.print(Panel(HELP, title="commands", border_style="blue"))
        elif prompt == "/history":
            show_history(await history.get_items())
        elif prompt == "/clear":
            await history.clear_session()
            console.print("[blue]history cleared[/]")
        elif prompt.startswith("/"):
            console.print(f"[red]unknown command {escape(prompt)}[/] (try /help)")
        elif prompt:
            try:
                await run_request(agent, session, history, ledger, prompt)
            except MODEL_ERRORS as e:  # a failed request must not end the session
                console.print(Panel(escape(model_failure(e)), title="this request failed", border_style="red"))


if __name__ == "__main__":
    run_main(main)
