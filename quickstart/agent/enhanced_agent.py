"""The full terminal experience: a coding agent in a Sandkasten sandbox with a rich UI,
token-by-token streaming, visible tool calls and their results, a conversation history that
survives restarts (SQLite) and a persistent workspace whose files survive sessions.

    uv run enhanced_agent.py [--workspace ID] [--state-dir DIR]

Commands: /help, /history, /clear (forget the conversation), /quit (or Ctrl-D).
The history and the workspace id are kept in --state-dir (default ./.agent_state).
Needs OPENAI_API_KEY, SANDKASTEN_URL, SANDKASTEN_API_KEY (see quickstart/README.md).
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path
from typing import Any

from agents import Runner, SQLiteSession
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sandbox_tools import build_agent, configure_model_access, model_failure, open_sandbox, read_line, run_main

console = Console(highlight=False)
HELP = """[bold]/help[/]     this help
[bold]/history[/]  the conversation so far (kept across restarts)
[bold]/clear[/]    forget the conversation (the workspace files stay)
[bold]/quit[/]     leave (Ctrl-D too); the sandbox session ends, the workspace stays
Anything else is a request for the agent, e.g. [italic]write primes.py up to 100 and run it[/]"""


def remembered_workspace(state_dir: Path, explicit: str | None) -> str:
    """The workspace id: given, or the one this state dir used before, or a new one."""
    path = state_dir / "workspace_id"
    if explicit:
        path.write_text(explicit + "\n")
        return explicit
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    wid = "agent-" + secrets.token_hex(4)
    path.write_text(wid + "\n")
    return wid


def _short(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f" … (+{len(text) - limit} chars)"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def show_history(items: list[dict]) -> None:
    if not items:
        console.print(Panel("(no history yet)", title="history", border_style="blue"))
        return
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for item in items:
        kind, role = item.get("type", "message"), item.get("role")
        if kind == "message" and role == "user":
            table.add_row("[green]you[/]", escape(_short(_text_of(item.get("content")))))
        elif kind == "message" and role == "assistant":
            table.add_row("[magenta]agent[/]", escape(_short(_text_of(item.get("content")))))
        elif kind == "function_call":
            table.add_row("[yellow]tool[/]", escape(f"{item.get('name')}({_short(item.get('arguments', ''), 200)})"))
        elif kind == "function_call_output":
            table.add_row("[yellow]  →[/]", escape(_short(str(item.get("output", "")), 200)))
    console.print(Panel(table, title=f"history ({len(items)} items)", border_style="blue"))


def show_tool_call(raw: Any) -> None:
    name = getattr(raw, "name", None) or (raw.get("name") if isinstance(raw, dict) else "tool")
    args = getattr(raw, "arguments", None) or (raw.get("arguments") if isinstance(raw, dict) else "")
    try:
        shown = "\n".join(f"{k}: {v}" for k, v in json.loads(args).items())
    except (ValueError, AttributeError):
        shown = str(args)
    console.print(Panel(escape(_short(shown, 1500)), title=f"⚙ {name}", title_align="left", border_style="yellow"))


def show_tool_output(output: Any) -> None:
    text = str(output)
    style = "red" if text.startswith("error:") else "cyan"
    console.print(Panel(escape(_short(text, 1500)), title="result", title_align="left", border_style=style))


async def answer(agent, prompt: str, history: SQLiteSession) -> None:
    """One request, streamed: text deltas as they come, tool calls and results as boxes."""
    speaking = False
    result = Runner.run_streamed(agent, prompt, session=history, max_turns=20)
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
                show_tool_call(event.item.raw_item)
            else:
                show_tool_output(event.item.output)
    if speaking:
        console.print()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", help="workspace id (default: remembered in --state-dir, else a new one)")
    parser.add_argument("--state-dir", default=".agent_state", help="where history and workspace id are kept")
    parser.add_argument("--image", help="sandbox image (default: the daemon's default_image)")
    args = parser.parse_args()
    configure_model_access()
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    workspace_id = remembered_workspace(state_dir, args.workspace)
    history = SQLiteSession("enhanced-agent", state_dir / "history.db")
    try:
        async with open_sandbox(workspace_id, args.image) as sandbox:
            agent = build_agent(sandbox)
            remembered = len(await history.get_items())
            console.print(Panel(
                f"session [bold]{sandbox.id}[/] · image [bold]{escape(sandbox.info.image)}[/] · "
                f"workspace [bold]{escape(workspace_id)}[/]\n"
                f"history: {remembered} items remembered · [bold]/help[/] for commands",
                title="Sandkasten coding agent", border_style="green"))
            while True:
                try:
                    prompt = (await read_line(console.input, "\n[bold green]you ›[/] ")).strip()
                except EOFError:
                    break
                if prompt in ("/quit", "/exit"):
                    break
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
                        await answer(agent, prompt, history)
                    except Exception as e:  # noqa: BLE001 - a failed turn must not end the session
                        console.print(Panel(escape(model_failure(e)), title="this turn failed",
                                            border_style="red"))
    finally:
        history.close()
    console.print("[green]bye[/] (workspace kept: " + escape(workspace_id) + ")")
    return 0


if __name__ == "__main__":
    run_main(main)
