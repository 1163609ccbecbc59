"""A SandboxAgent (the Agents SDK's own) on Sandkasten, for real: quickstart/agent/sandbox_agent.py
runs as a subprocess against the scripted model (tests/scripted_openai.py) and a real daemon
with the `python` image. It does a small coding task with `apply_patch` and `exec_command`;
in the middle the daemon is SIGKILLed and restarted (the agent does not notice), later the agent
itself is SIGKILLed, and started again it resumes the unfinished request in the same sandbox —
files, a background process and the run id intact — and every command it issued is in
`sandkasten audit export` under that run's trace id."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import time
from pathlib import Path

import pytest

from sandkasten.runtime.layout import Layout
from tests.daemons import API_KEY, BIN, REPO
from tests.scripted_openai import Call, CustomCall, Say, ScriptedOpenAI, Turn, read_conversation

AGENT_DIR = REPO / "quickstart" / "agent"
PROMPT = "write wordfreq.py that counts the words of sample.txt"

ADD_FILES = """*** Begin Patch
*** Add File: wordfreq.py
+import sys
+from collections import Counter
+
+words = open(sys.argv[1]).read().split()
+for word, n in Counter(words).most_common():
+    print(n, word)
*** Add File: sample.txt
+The cat and the hat and THE bat
*** End Patch"""
LOWERCASE = """*** Begin Patch
*** Update File: wordfreq.py
@@
-words = open(sys.argv[1]).read().split()
+words = open(sys.argv[1]).read().lower().split()
*** End Patch"""
# the daemon is SIGKILLed while this runs (after the marker appears), and started again
THROUGH_DAEMON_KILL = ("python3 wordfreq.py sample.txt > counts.txt && touch daemon-step.started && sleep 3 "
                       "&& cat counts.txt")
# the agent is SIGKILLed while this runs; resumed, the model asks for it again (idempotent)
THROUGH_AGENT_KILL = ("[ -e bg.pid ] || { nohup sleep 600 >/dev/null 2>&1 & echo $! > bg.pid; }; "
                      "touch agent-step.started; sleep 4; echo slow-done > slow.txt")
FINAL = "python3 wordfreq.py sample.txt; cat slow.txt; kill -0 $(cat bg.pid) && echo bg-alive"

SCRIPT = [Turn(PROMPT, [
    [CustomCall("apply_patch", ADD_FILES)],
    [Call("exec_command", {"cmd": THROUGH_DAEMON_KILL, "yield_time_ms": 60_000})],
    [Call("exec_command", {"cmd": THROUGH_AGENT_KILL, "yield_time_ms": 60_000})],
    [CustomCall("apply_patch", LOWERCASE)],
    [Call("exec_command", {"cmd": FINAL, "yield_time_ms": 30_000})],
    lambda conv: Say("wordfreq.py counts words, case-insensitively:\n" + conv.last_output),
])]


@pytest.fixture
def py_daemon(daemon_factory, python_image):
    return daemon_factory(default_image=python_image).start()


def agent_env(model: ScriptedOpenAI, daemon) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SANDKASTEN_"))}
    env.update(OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="test", SANDKASTEN_URL=daemon.url,
               SANDKASTEN_API_KEY=API_KEY, PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


def start_agent(env: dict, state: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([str(BIN / "python"), "sandbox_agent.py", "--state-dir", str(state), PROMPT],
                                cwd=AGENT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(check, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ended_well(row: dict) -> bool:
    """A command (exec) or process that ran to its end with exit code 0."""
    return row["status"] in ("finished", "exited") and row["exit_code"] == 0


def next_step(steps: queue.Queue, index: int) -> None:
    while True:
        if steps.get(timeout=90) == index:
            return


def test_sandbox_agent_survives_a_daemon_sigkill_and_its_own_kill_and_is_audited(py_daemon, tmp_path):
    steps: queue.Queue = queue.Queue()
    state, log = tmp_path / "state", tmp_path / "agent.log"
    with ScriptedOpenAI(SCRIPT, on_step=lambda prompt, index: steps.put(index)) as model:
        env = agent_env(model, py_daemon)
        agent = start_agent(env, state, log)
        try:
            next_step(steps, 1)
            [live] = py_daemon.client.get("/v1/sessions").json()
            sid = live["id"]
            workspace = Layout(py_daemon.data_dir).of(sid).workspace   # sessions/<sid>/disk/workspace
            wait_for(lambda: (workspace / "daemon-step.started").exists(), "the command run through the daemon kill")
            py_daemon.kill()                                   # SIGKILL, mid-command
            time.sleep(0.5)
            py_daemon.start()                                  # same port, same journal: sandboxes adopted

            next_step(steps, 2)
            wait_for(lambda: (workspace / "agent-step.started").exists(), "the command run through the agent kill")
            agent.kill()                                       # SIGKILL the agent, mid-command
            assert agent.wait(timeout=30) == -9
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        first_log = log.read_text()
        first_run = re.search(r"run (trace_[0-9a-f]{32})", first_log).group(1)
        assert f"sandbox {sid} (new)" in first_log
        assert py_daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "running"   # nothing tore it down
        wait_for(lambda: (workspace / "slow.txt").exists(), "the killed agent's command to run on to its end")

        resumed = subprocess.run([str(BIN / "python"), "sandbox_agent.py", "--state-dir", str(state), PROMPT],
                                 cwd=AGENT_DIR, env=env, capture_output=True, text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        out = resumed.stdout
    assert not model.errors, model.errors

    # the second process reattached to the same sandbox and finished the same request, same run id
    assert f"sandbox {sid} (reattached)" in out and "resuming the unfinished request" in out
    assert f"run {first_run}" in out and out.count("run trace_") == 1
    assert "1 bat" in out and "3 the" in out and "slow-done" in out and "bg-alive" in out
    assert py_daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"   # a clean exit ends it

    # what the model saw: the command cut by the daemon's SIGKILL still answered with its output
    outputs = [o for r in model.requests for o in read_conversation(r).outputs]
    through_daemon = next(o for o in outputs if "Process exited with code 0" in o and "2 and" in o)
    assert "1 THE" in through_daemon and "1 The" in through_daemon   # wordfreq.py before the patch

    # the audit: every command of the run, tagged with its trace id, across both agent processes
    export = py_daemon.cli("audit", "export", "--format", "jsonl", "--session", sid)
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    run_rows = [r for r in rows if r["actor"].endswith(f"/run:{first_run}")]
    cmds = [r["cmd"] for r in run_rows]
    assert any(THROUGH_DAEMON_KILL in c for c in cmds) and any(FINAL in c for c in cmds)
    killed = [r for r in run_rows if THROUGH_AGENT_KILL in r["cmd"]]
    assert len(killed) == 2 and all(ended_well(r) for r in killed)
    # (the first ran on to its end after its agent died; the resumed run asked for it once more)
    assert ended_well(next(r for r in run_rows if THROUGH_DAEMON_KILL in r["cmd"]))
    # exec_command's commands ran as processes beside the shell (the SDK's PTY path)
    assert all(r["kind"] == "process" for r in run_rows if "wordfreq.py sample.txt" in r["cmd"])
    assert {"exec_command", "write_stdin", "apply_patch"} <= set(read_conversation(model.requests[0]).tools)
    assert all(r["actor"].startswith("api:") for r in rows)


# ------------------------------------------------------------------ an interactive process outlives its agent
def session_number(conv) -> int:
    """The process number exec_command gave the model ("Process running with session ID N")."""
    return int(re.search(r"session ID (\d+)", "\n".join(conv.outputs)).group(1))


REPL_PROMPT = "keep a python REPL open and compute with it"
REPL_SCRIPT = [Turn(REPL_PROMPT, [
    [Call("exec_command", {"cmd": "python3 -i -q", "tty": True, "yield_time_ms": 1500})],
    lambda conv: [Call("write_stdin", {"session_id": session_number(conv), "chars": "x = 41\n",
                                       "yield_time_ms": 500})],
    # the agent is SIGKILLed while the REPL sleeps; resumed, the model sends it once more
    lambda conv: [Call("write_stdin", {"session_id": session_number(conv), "yield_time_ms": 8000,
                                       "chars": "import time; time.sleep(2); print('slept', x)\n"})],
    lambda conv: [Call("write_stdin", {"session_id": session_number(conv), "chars": "print(x + 1)\n",
                                       "yield_time_ms": 1000})],
    lambda conv: Say("the REPL still knows x:\n" + conv.last_output),
])]


def test_an_interactive_process_and_its_state_outlive_the_agent_and_the_daemon(py_daemon, tmp_path):
    steps: queue.Queue = queue.Queue()
    state, log = tmp_path / "state", tmp_path / "agent.log"
    with ScriptedOpenAI(REPL_SCRIPT, on_step=lambda prompt, index: steps.put(index)) as model:
        env = agent_env(model, py_daemon)
        cmd = [str(BIN / "python"), "sandbox_agent.py", "--state-dir", str(state), REPL_PROMPT]
        with open(log, "ab") as out:
            agent = subprocess.Popen(cmd, cwd=AGENT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            next_step(steps, 2)
            [live] = py_daemon.client.get("/v1/sessions").json()
            sid = live["id"]
            wait_for(lambda: any(p["status"] == "running" and p["input_bytes"] > 7 for p in
                                 py_daemon.client.get(f"/v1/sessions/{sid}/processes").json()),
                     "the sleep typed into the REPL")
            agent.kill()
            assert agent.wait(timeout=30) == -9
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        py_daemon.kill()                                       # and the daemon too, while no agent is there
        py_daemon.start()
        [repl] = py_daemon.client.get(f"/v1/sessions/{sid}/processes").json()
        assert repl["status"] == "running" and repl["pty"] is not None   # nothing killed it
        resumed = subprocess.run(cmd, cwd=AGENT_DIR, env=env, capture_output=True, text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not model.errors, model.errors
    out = resumed.stdout
    assert f"sandbox {sid} (reattached)" in out and "resuming the unfinished request" in out
    last = [read_conversation(r) for r in model.requests][-1]
    assert "42" in last.last_output and "slept 41" in "\n".join(last.outputs)
    # one REPL all along: the resumed agent found it by its number and typed into it
    rows = [json.loads(line) for line in py_daemon.cli("audit", "export", "--session", sid).stdout.splitlines()]
    repls = [r for r in rows if r["kind"] == "process" and "python3 -i -q" in r["cmd"]]
    typed = [r["input"] for r in rows if r["kind"] == "input" and r["status"] == "stdin"
             and r["exec_id"] == repl["process_id"]]
    sleep = "import time; time.sleep(2); print('slept', x)\n"   # sent again: its answer died with the agent
    assert len(repls) == 1 and typed == ["x = 41\n", sleep, sleep, "print(x + 1)\n"], typed
    assert repls[0]["actor"].endswith("/run:" + re.search(r"run (trace_[0-9a-f]{32})", out).group(1))
