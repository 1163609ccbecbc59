"""One task, start to finish: the agent writes a program in a Sandkasten sandbox, runs it and
shows the result.

    uv run coding_agent.py                      # the Fibonacci task below
    uv run coding_agent.py "write primes.py up to 100 and run it"
    uv run coding_agent.py --workspace demo "…" # keep the files in workspace "demo"

Needs OPENAI_API_KEY (OPENAI_BASE_URL for another OpenAI-compatible endpoint), SANDKASTEN_URL
and SANDKASTEN_API_KEY (see quickstart/README.md).
"""

from __future__ import annotations

import argparse
import sys

from agents import Runner

from sandbox_tools import MODEL_ERRORS, build_agent, configure_model_access, model_failure, open_sandbox, run_main

TASK = ("Write a Python script fibonacci.py that writes the first 20 Fibonacci numbers "
        "(starting 0, 1) to fibonacci.txt, one per line. Run it and show me the content of fibonacci.txt.")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", default=TASK, help="what the agent should do")
    parser.add_argument("--workspace", help="persistent workspace id (files outlive the session)")
    parser.add_argument("--image", help="sandbox image (default: the daemon's default_image)")
    args = parser.parse_args()
    configure_model_access()
    async with open_sandbox(args.workspace, args.image) as sandbox:
        print(f"sandbox session {sandbox.id} (image {sandbox.info.image}"
              + (f", workspace {args.workspace})" if args.workspace else ")"))
        print(f"task: {args.task}\n")
        try:
            result = await Runner.run(build_agent(sandbox), args.task, max_turns=20)
        except MODEL_ERRORS as e:
            failure = model_failure(e)
        else:
            print(result.final_output)
            return 0
    print(f"error: the agent run failed: {failure}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    run_main(main)
