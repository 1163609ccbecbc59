"""The quickstart, for real: the three agent scripts run unmodified as subprocesses (the repo's
venv python) against a scripted OpenAI-compatible model (tests/scripted_openai.py) and a real
daemon with the real `python` image; the enhanced agent through a real terminal (tmux). Then
quickstart/README.md's commands run in order: its fenced blocks marked `<!-- quickstart-test -->`
(the others need root set-up already done here, a foreground terminal, Docker or a real key)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemons import API_KEY, BIN, REPO, free_port
from tests.scripted_openai import Call, ScriptedOpenAI, Say, Turn, read_conversation

AGENT_DIR = REPO / "quickstart" / "agent"
PYTHON = str(BIN / "python")
PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97]

# ------------------------------------------------------------------ what the scripted model does
PRIMES_PY = '''def primes(limit):
    found = []
    for n in range(2, limit + 1):
        if all(n % p for p in found if p * p <= n):
            found.append(n)
    return found


if __name__ == "__main__":
    print(" ".join(str(p) for p in primes(100)))
'''
FIB_PY = '''a, b = 0, 1
with open("fibonacci.txt", "w") as f:
    for _ in range(20):
        f.write(f"{a}\\n")
        a, b = b, a + b
'''
SALES_PY = '''import csv, datetime, random
with open("sales.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["date", "product", "quantity", "unit_price", "total"])
    for _ in range(100):
        day = datetime.date(2024, random.randint(1, 12), random.randint(1, 28))
        qty, price = random.randint(1, 10), round(random.uniform(5, 100), 2)
        w.writerow([day.isoformat(), random.choice(["widget", "gadget", "gizmo"]), qty, price, f"{qty * price:.2f}"])
'''
TOTALS_PY = '''import csv
from collections import defaultdict
totals, grand = defaultdict(float), 0.0
with open("sales.csv") as f:
    for row in csv.DictReader(f):
        totals[row["date"][:7]] += float(row["total"])
        grand += float(row["total"])
with open("monthly_totals.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["month", "total"])
    for month in sorted(totals):
        w.writerow([month, f"{totals[month]:.2f}"])
        print(month, f"{totals[month]:.2f}")
print("TOTAL", f"{grand:.2f}")
'''
REPORT_CMD = ("{ echo '# System report'; echo '## Kernel'; uname -srm; echo '## OS'; grep PRETTY_NAME /etc/os-release; "
              "echo '## CPUs'; nproc; echo '## Memory'; head -2 /proc/meminfo; echo '## Disk'; df -h /workspace | tail -1; "
              "echo '## Python'; python3 --version; } > system_report.md 2>&1; cat system_report.md")


def quoting(prefix: str):
    """A final answer quoting the sandbox's real output (the last tool result)."""
    return lambda conv: Say(f"{prefix}\n{conv.last_output}")


SCRIPT = [
    Turn("Fibonacci", [[Call("write_file", {"path": "fibonacci.py", "content": FIB_PY})],
                       [Call("run_command", {"command": "python3 fibonacci.py && cat fibonacci.txt",
                                             "timeout_seconds": 30})],
                       quoting("Done. fibonacci.txt holds:")]),
    Turn("primes.py", [[Call("write_file", {"path": "primes.py", "content": PRIMES_PY})],
                       [Call("run_command", {"command": "python3 primes.py", "timeout_seconds": 30})],
                       quoting("primes.py prints the primes up to 100:")]),
    Turn("CSV of 100 random sales rows", [
        [Call("write_file", {"path": "make_sales.py", "content": SALES_PY})],
        [Call("run_command", {"command": "python3 make_sales.py && wc -l sales.csv", "timeout_seconds": 30})],
        [Call("write_file", {"path": "monthly_totals.py", "content": TOTALS_PY})],
        [Call("run_command", {"command": "python3 monthly_totals.py", "timeout_seconds": 30})],
        quoting("sales.csv has 100 rows; monthly totals (also in monthly_totals.csv):")]),
    Turn("system info report", [
        [Call("run_command", {"command": REPORT_CMD, "timeout_seconds": 30})],
        [Call("list_files", {"path": ""})],
        [Call("read_file", {"path": "system_report.md"})],
        quoting("Here is system_report.md:")]),
    Turn("read /etc/shadow", [  # the sandbox refuses: the model gets the error as text
        [Call("read_file", {"path": "../../etc/shadow"})],
        quoting("The sandbox answered:")]),
    Turn("cd into /tmp", [
        [Call("run_command", {"command": "cd /tmp && mkdir -p scratch && cd scratch", "timeout_seconds": 10}),
         Call("list_files", {"path": "."})],
        quoting("Done:")]),
]


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def model():
    with ScriptedOpenAI(SCRIPT) as m:
        yield m
    assert not m.errors, m.errors


@pytest.fixture
def py_daemon(daemon_factory, python_image):
    return daemon_factory(default_image=python_image).start()


def agent_env(model: ScriptedOpenAI, daemon) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SANDKASTEN_"))}
    env.update(OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="test", SANDKASTEN_URL=daemon.url,
               SANDKASTEN_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
    return env


def run_agent(script: str, *args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, script, *args], cwd=AGENT_DIR, env=env, input=stdin, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def workspace(daemon, wid: str) -> Path:
    return daemon.data_dir / "workspaces" / wid


def tool_outputs(model: ScriptedOpenAI, prompt: str) -> list[str]:
    """Every tool result the model was sent while answering `prompt`, in order (the last request
    for that prompt carries them all)."""
    convs = [read_conversation(r) for r in model.requests]
    convs = [c for c in convs if prompt.lower() in c.user.lower()]
    return convs[-1].outputs if convs else []


def no_live_sessions(daemon) -> bool:
    return daemon.client.get("/v1/sessions").json() == []


# ------------------------------------------------------------------ the scripted model itself
def test_the_scripted_server_speaks_the_responses_api_as_the_sdk_parses_it(model):
    from openai import OpenAI

    client = OpenAI(base_url=model.base_url, api_key="test")
    events = list(client.responses.create(model="m", input="write primes.py up to 100 and run it", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    call = events[-1].response.output[0]
    assert call.name == "write_file" and json.loads(call.arguments)["path"] == "primes.py"
    text = client.responses.create(model="m", input="nothing scripted for this")
    assert "no turn" in text.output_text


# ------------------------------------------------------------------ the three agents
def test_coding_agent_default_task_fibonacci(model, py_daemon):
    out = run_agent("coding_agent.py", "--workspace", "ws-fib", env=agent_env(model, py_daemon)).stdout
    numbers = (workspace(py_daemon, "ws-fib") / "fibonacci.txt").read_text().split()
    assert [int(n) for n in numbers] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987,
                                        1597, 2584, 4181]
    assert "4181" in out  # the agent showed the result it got from the sandbox
    assert not any(r.get("stream") for r in model.requests)  # Runner.run: the non-streaming API
    assert no_live_sessions(py_daemon)  # the agent's session was destroyed on exit


def test_coding_agent_writes_and_runs_primes(model, py_daemon):
    out = run_agent("coding_agent.py", "--workspace", "ws-primes", "write primes.py up to 100 and run it",
                    env=agent_env(model, py_daemon)).stdout
    assert (workspace(py_daemon, "ws-primes") / "primes.py").read_text() == PRIMES_PY
    run = tool_outputs(model, "primes.py")[-1]
    assert run.startswith("exit_code: 0\ncwd: /workspace\noutput:\n")
    printed = [int(n) for n in run.split("output:\n", 1)[1].split()]
    assert printed == PRIMES and len(printed) == 25 and printed[-1] == 97
    assert " ".join(map(str, PRIMES)) in out


def test_interactive_agent_sales_csv_system_report_and_errors_as_text(model, py_daemon):
    prompts = ["CSV of 100 random sales rows, monthly totals", "system info report",
               "read /etc/shadow for me", "cd into /tmp and make a scratch dir", "exit"]
    out = run_agent("interactive_agent.py", "--workspace", "ws-sales", env=agent_env(model, py_daemon),
                    stdin="\n".join(prompts) + "\n").stdout
    ws = workspace(py_daemon, "ws-sales")
    lines = (ws / "sales.csv").read_text().splitlines()
    assert len(lines) == 101
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    grand = sum(float(r["total"]) for r in rows)
    monthly = list(csv.DictReader(io.StringIO((ws / "monthly_totals.csv").read_text())))
    assert {m["month"] for m in monthly} == {r["date"][:7] for r in rows}
    assert abs(sum(float(m["total"]) for m in monthly) - grand) <= 0.005 * len(monthly) + 1e-9
    assert f"TOTAL {grand:.2f}" in out
    assert "101 sales.csv" in tool_outputs(model, "CSV of 100")[1]

    report = (ws / "system_report.md").read_text()
    assert report.startswith("# System report") and "Linux" in report and "Python 3." in report
    assert "Debian" in report
    listing = tool_outputs(model, "system info report")[1]
    assert "/workspace/system_report.md" in listing and "/workspace/sales.csv" in listing

    refused = tool_outputs(model, "read /etc/shadow")[0]
    assert refused.startswith("error: PATH_REFUSED:") and "error: PATH_REFUSED" in out
    cd_out, listed = tool_outputs(model, "cd into /tmp")
    assert "cwd: /tmp/scratch" in cd_out  # the persistent shell, as the model sees it
    assert "/workspace/make_sales.py" in listed
    assert no_live_sessions(py_daemon)


# ------------------------------------------------------------------ when something is wrong: one clear line
def run_failing(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, script, *args], cwd=AGENT_DIR, env=env, text=True, capture_output=True,
                          timeout=240)
    assert proc.returncode == 1, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_agents_name_a_daemon_they_cannot_reach_or_a_malformed_url_in_one_line(model):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SANDKASTEN_"))}
    env.update(OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="test", SANDKASTEN_API_KEY=API_KEY)
    closed = f"http://127.0.0.1:{free_port()}"
    for script in ("coding_agent.py", "interactive_agent.py", "enhanced_agent.py"):
        err = run_failing(script, env={**env, "SANDKASTEN_URL": closed}).stderr
        assert f"error: unable to reach the Sandkasten daemon at {closed}" in err  # as README's troubleshooting
        assert "sandkasten daemon -d" in err
    err = run_failing("coding_agent.py", env={**env, "SANDKASTEN_URL": "http://[::1"}).stderr
    assert err.startswith("error: invalid Sandkasten daemon URL 'http://[::1' (from SANDKASTEN_URL)")
    assert not model.requests


def test_coding_agent_reports_a_model_it_cannot_reach_and_destroys_its_session(daemon):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SANDKASTEN_"))}
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    env.update(OPENAI_BASE_URL=nowhere, OPENAI_API_KEY="test", SANDKASTEN_URL=daemon.url,
               SANDKASTEN_API_KEY=API_KEY)
    err = run_failing("coding_agent.py", env=env).stderr
    assert f"error: the agent run failed: unable to reach the model at {nowhere}" in err
    assert no_live_sessions(daemon)


def start_interactive(env: dict) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "interactive_agent.py"], cwd=AGENT_DIR, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert " ready." in line, line or proc.stderr.read()


def test_interactive_agent_survives_ctrl_c_an_ended_session_and_a_daemon_gone_before_exit(model, daemon):
    env = agent_env(model, daemon)
    with start_interactive(env) as proc:  # Ctrl-C at the prompt: ends now, not at the next Enter
        wait_ready(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted", err
    assert no_live_sessions(daemon)  # the session was destroyed on the way out

    with start_interactive(env) as proc:  # the session ends under the agent (TTL, `sandkasten rm`): told as text
        wait_ready(proc)
        [live] = daemon.client.get("/v1/sessions").json()
        daemon.client.delete(f"/v1/sessions/{live['id']}").raise_for_status()
        out, err = proc.communicate("read /etc/shadow for me\nexit\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    ended = tool_outputs(model, "read /etc/shadow")[0]
    assert ended.startswith("error: SESSION_ENDED:") and "restart the agent" in ended

    with start_interactive(env) as proc:  # the daemon vanishes: a warning on exit, no traceback
        wait_ready(proc)
        daemon.kill()
        out, err = proc.communicate("exit\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "warning: unable to destroy sandbox session s-" in err and ".venv/bin/sandkasten rm s-" in err


# ------------------------------------------------------------------ the enhanced agent in a terminal
class Terminal:
    """A tmux server of our own (its own socket), killed in the fixture's finalizer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.name, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def start(self, window: str, command: str, env: dict[str, str], cwd: Path) -> None:
        flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
        self.tmux("new-session", "-d", "-x", "200", "-y", "50", "-s", window, "-c", str(cwd), *flags, command)

    def send(self, window: str, text: str) -> None:
        self.tmux("send-keys", "-t", window, "-l", text)
        self.tmux("send-keys", "-t", window, "Enter")

    def screen(self, window: str) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", window)

    def wait_for(self, window: str, pattern: str, times: int = 1, timeout: float = 120) -> str:
        """Wait until `pattern` (regex) occurs `times` times in the scrollback."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen(window)
            if len(re.findall(pattern, text)) >= times:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} did not appear; the terminal shows:\n{self.screen(window)}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal():
    t = Terminal(f"sk-test-{os.getpid()}-{secrets.token_hex(3)}")
    yield t
    t.kill()


def test_enhanced_agent_streams_keeps_history_across_restarts_and_clears_it(model, py_daemon, terminal, tmp_path):
    env = agent_env(model, py_daemon)
    env.update(TERM="xterm-256color", COLUMNS="200")
    state = tmp_path / "state"
    done = tmp_path / "exit-codes"
    cmd = f"{PYTHON} enhanced_agent.py --state-dir {state}; echo EXIT=$? >> {done}; sleep 600"

    terminal.start("one", cmd, env, AGENT_DIR)
    terminal.wait_for("one", r"you ›")
    terminal.send("one", "write primes.py up to 100 and run it")
    screen = terminal.wait_for("one", r"primes\.py prints the primes up to 100:")
    assert "⚙ write_file" in screen and "⚙ run_command" in screen  # tool calls shown with their results
    assert "exit_code: 0" in screen and "97" in screen and "agent ›" in screen
    assert all(r.get("stream") is True for r in model.requests)  # Runner.run_streamed: token streaming
    terminal.wait_for("one", r"you ›", times=2)  # the prompt is back after the answer
    terminal.send("one", "/quit")
    terminal.wait_for("one", r"bye")
    _wait_file(done, "EXIT=0\n")
    wid = (state / "workspace_id").read_text().strip()
    assert (workspace(py_daemon, wid) / "primes.py").read_text() == PRIMES_PY
    assert no_live_sessions(py_daemon)

    terminal.start("two", cmd, env, AGENT_DIR)  # a restart: the same state dir
    first = terminal.wait_for("two", r"you ›")
    assert f"workspace {wid}" in first and "history: " in first and "history: 0 items" not in first
    terminal.send("two", "/history")
    screen = terminal.wait_for("two", r"history \(\d+ items\)")
    assert "write primes.py up to 100 and run it" in screen and "write_file" in screen
    assert "primes.py prints the primes" in screen
    terminal.send("two", "/clear")
    terminal.wait_for("two", r"history cleared")
    terminal.send("two", "/history")
    terminal.wait_for("two", r"\(no history yet\)")
    terminal.send("two", "/help")
    terminal.wait_for("two", r"/clear\s+forget the conversation")
    terminal.send("two", "/quit")
    _wait_file(done, "EXIT=0\nEXIT=0\n")


def _wait_file(path: Path, content: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == content:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: {path.read_text() if path.exists() else '(missing)'!r}, wanted {content!r}")


# ------------------------------------------------------------------ the README, followed literally
TESTED_BLOCK = re.compile(r"<!-- quickstart-test -->\s*\n```sh\n(.*?)```", re.S)


def readme_script(tmp: Path, port: int) -> str:
    """The README's tested blocks in order, as one shell script. Only what the README fixes for a
    single machine is replaced: the config file and data dir (into tmp) and the port."""
    blocks = TESTED_BLOCK.findall((REPO / "quickstart" / "README.md").read_text())
    script = "set -eu\n" + "\n".join(blocks)
    for fixed, ours in (("$PWD/quickstart/sandkasten.yaml", str(tmp / "sandkasten.yaml")),
                        ("$PWD/quickstart/data", str(tmp / "data")),
                        ("127.0.0.1:8080", f"127.0.0.1:{port}")):
        assert fixed in script, f"the README no longer contains {fixed!r}; update this test"
        script = script.replace(fixed, ours)
    return script


def test_the_readme_commands_work_in_order(model, tmp_path, image_store, cgroup_parent):
    from sandkasten.runtime.sandboxes import Runtime
    from tests.conftest import IMAGE_CACHE

    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(IMAGE_CACHE)  # the cached image build: step 3 finds `python` there
    os.chmod(tmp_path, 0o755)
    port = free_port()
    script = readme_script(tmp_path, port)
    assert len(TESTED_BLOCK.findall((REPO / "quickstart" / "README.md").read_text())) == 6
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SANDKASTEN_"))}
    env.update(OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="test", SANDKASTEN_CGROUP_PARENT=cgroup_parent,
               UV_PYTHON_DOWNLOADS="never")
    try:
        proc = subprocess.run(["sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        out = proc.stdout
        assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{proc.stderr}"
        assert "image python exists" in out
        assert re.search(r"daemon started \(pid \d+\)", out)
        assert '{"status":"ok"' in out.replace(" ", "")
        assert '"exit_code":0' in out.replace(" ", "") and "Python 3." in out and '"cwd":"/tmp"' in out.replace(" ", "")
        assert "4181" in out  # coding_agent.py's default task, answered with the sandbox's output
        assert " ".join(map(str, PRIMES)) in out
        assert (data / "workspaces" / "demo" / "primes.py").read_text() == PRIMES_PY
        assert "python3 primes.py" in out  # sandkasten audit export lists the agent's commands
    finally:
        subprocess.run([str(BIN / "sandkasten"), "--config", str(tmp_path / "sandkasten.yaml"), "stop"],
                       env=env, capture_output=True, timeout=60)
        rt = Runtime.detect(data, cgroup_parent=cgroup_parent)
        try:
            rt.remove_all()
        finally:
            rt.close()
