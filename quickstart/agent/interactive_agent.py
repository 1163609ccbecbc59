"""A plain prompt loop: talk to a coding agent whose tools run in one Sandkasten sandbox for
the whole conversation (the shell keeps its state between your prompts).

    uv run interactive_agent.py [--workspace ID]

Type a request; `exit` or Ctrl-D ends (the sandbox session is destroyed, a named workspace
is kept). Needs OPENAI_API_KEY, SANDKASTEN_URL, SANDKASTEN_API_KEY (see quickstart/README.md).
"""

from __future__ import annotations

import argparse

from agents import Runner, SQLiteSession

from sandbox_tools import build_agent, configure_model_access, model_failure, open_sandbox, read_line, run_main


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", help="persistent workspace id (files outlive the session)")
    parser.add_argument("--image", help="sandbox image (default: the daemon's default_image)")
    args = parser.parse_args()
    configure_model_access()
    memory = SQLiteSession("interactive")  # in memory: this conversation only
    async with open_sandbox(args.workspace, args.image) as sandbox:
        agent = build_agent(sandbox)
        print(f"sandbox session {sandbox.id} ready. Ask for something; 'exit' or Ctrl-D to leave.")
        while True:
            try:
                prompt = (await read_line(input, "\nyou> ")).strip()
            except EOFError:
                print()
                break
            if prompt.lower() in ("exit", "quit", "/quit"):
                break
            if not prompt:
                continue
            try:
                result = await Runner.run(agent, prompt, session=memory, max_turns=20)
            except Exception as e:  # noqa: BLE001 - a failed turn (model unreachable, …) must not end the loop
                print(f"agent> (this turn failed: {model_failure(e)})")
                continue
            print(f"agent> {result.final_output}")
    memory.close()


if __name__ == "__main__":
    run_main(main)
