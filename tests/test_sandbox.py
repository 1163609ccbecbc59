"""Real sandboxes: namespaces, cgroups, overlay, the runner's persistent shell."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sandkasten.errors import ImageInvalid, ImageNotFound, InvalidRequest
from sandkasten.runtime.procfs import mounts_under
from sandkasten.runtime.spec import ExecRequest

_ids = itertools.count()


def run(rt, sid, cmd, timeout_ms=10_000):
    eid = f"e{next(_ids)}"
    res = rt.exec(sid, ExecRequest(eid, cmd, timeout_ms=timeout_ms))
    out, err, both, _ = rt.read_output(sid, eid)
    return res, out.decode(), err.decode(), both.decode()


def create(rt, sid="s-test1", image="base", **opts):
    rt.create(rt.spec(sid, image, **opts))
    return sid


@pytest.fixture(params=["base", "python"])
def image(request):
    if request.param == "python":
        return request.getfixturevalue("python_image")
    return request.param


def test_shell_state_persists(runtime, image):
    sid = create(runtime, image=image)
    run(runtime, sid, "cd /tmp; export X=1; greet() { echo hello $1; }; Y=2")
    res, out, _, _ = run(runtime, sid, "pwd; echo $X $Y; greet you")
    assert out == "/tmp\n1 2\nhello you\n"
    assert res.cwd == "/tmp" and res.exit_code == 0


def test_background_process_survives_between_execs(runtime):
    sid = create(runtime)
    run(runtime, sid, "sleep 300 & echo $! > /tmp/bg.pid")
    res, out, _, _ = run(runtime, sid, "kill -0 $(cat /tmp/bg.pid) && echo alive")
    assert out == "alive\n"


def test_exit_codes_and_cwd(runtime):
    sid = create(runtime)
    assert run(runtime, sid, "false")[0].exit_code == 1
    assert run(runtime, sid, "(exit 42)")[0].exit_code == 42
    res, _, err, _ = run(runtime, sid, "no-such-command")
    assert res.exit_code == 127 and "not found" in err
    res = run(runtime, sid, "mkdir -p /workspace/a/b && cd /workspace/a/b")[0]
    assert res.cwd == "/workspace/a/b"
    # `exit` ends the shell: the exit code is reported and a fresh shell takes over
    res = run(runtime, sid, "exit 7")[0]
    assert res.exit_code == 7 and res.shell_restarted
    res, out, _, _ = run(runtime, sid, "echo still here; pwd")
    assert out == "still here\n/workspace\n"


def test_stdout_stderr_separate_and_interleaved(runtime):
    sid = create(runtime)
    res, out, err, both = run(runtime, sid, "echo one; echo two >&2; sleep 0.05; echo three")
    assert out == "one\nthree\n"
    assert err == "two\n"
    assert both == "one\ntwo\nthree\n"
    assert res.stdout_bytes == 10 and res.stderr_bytes == 4


def test_a_command_closing_or_redirecting_its_output_does_not_silence_the_next(runtime, image):
    sid = create(runtime, image=image)
    run(runtime, sid, "exec 1>&- 2>&-; echo lost")
    res, out, err, _ = run(runtime, sid, "echo back; echo err >&2")
    assert (res.exit_code, out, err) == (0, "back\n", "err\n")
    run(runtime, sid, "exec >/tmp/elsewhere 2>&1")
    _, out, _, _ = run(runtime, sid, "echo here; ls /proc/self/fd | wc -l")
    assert out.splitlines()[0] == "here"
    assert int(out.splitlines()[1]) <= 5, "spare pipe copies leaked into the command"


def test_large_output_and_large_command(runtime):
    sid = create(runtime)
    res, out, _, _ = run(runtime, sid, "head -c 3000000 /dev/zero | tr '\\0' x")
    assert len(out) == 3_000_000 and res.stdout_bytes == 3_000_000
    big = "echo " + "y" * 200_000 + " | wc -c"
    assert run(runtime, sid, big)[1].strip() == "200001"
    quoted = "printf '%s\\n' \"it's\" 'a \"quote\"' '$HOME'"
    assert run(runtime, sid, quoted)[1] == "it's\na \"quote\"\n$HOME\n"


def test_timeout_interrupts_only_the_command(runtime):
    sid = create(runtime)
    run(runtime, sid, "cd /tmp; export KEEP=yes; sleep 300 & echo $! > bg.pid")
    res = run(runtime, sid, "sleep 100", timeout_ms=300)[0]
    assert res.timed_out and not res.shell_restarted
    res = run(runtime, sid, "while :; do :; done", timeout_ms=300)[0]
    assert res.timed_out
    res = run(runtime, sid, "for i in 1 2 3; do sleep 30; done", timeout_ms=300)[0]
    assert res.timed_out
    res, out, _, _ = run(runtime, sid, "echo $KEEP; pwd; kill -0 $(cat bg.pid) && echo bg-alive")
    assert out == "yes\n/tmp\nbg-alive\n" and not res.timed_out


def test_isolation(runtime):
    sid = create(runtime, hostname="box1")
    _, out, _, _ = run(runtime, sid, "ps -o pid,comm")
    pids = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert "1" in pids and all(int(p) < 100 for p in pids)
    assert run(runtime, sid, "hostname")[1] == "box1\n"
    _, out, _, _ = run(runtime, sid, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert [line.strip() for line in out.splitlines()] == ["lo"]
    _, out, _, _ = run(runtime, sid, "cat /sys/class/net/lo/operstate 2>/dev/null; ip link 2>&1 | grep -c UP")
    # host files are not visible: the repo, the host's /etc/hostname, other sessions
    res, out, _, _ = run(runtime, sid, f"ls {os.getcwd()} /work 2>&1; cat /etc/os-release 2>&1 | head -1")
    assert "No such file" in out
    assert run(runtime, sid, "id -u")[1] == "65534\n"


@pytest.mark.parametrize("uid", [65534, 0])
def test_privileged_operations_refused(runtime, uid):
    sid = create(runtime, uid=uid, gid=uid)
    checks = {
        "mount": "mount -t tmpfs none /tmp",
        "unshare": "unshare -m true",
        "mknod": "mknod /tmp/sda b 8 0",
        "raw socket": "ping -c1 -W1 127.0.0.1",
        "chroot": "chroot / true",
        "nsenter": "nsenter -t 1 -m true",
        # sysctls that check only file modes (kernel.core_pattern is one): /proc/sys is read-only;
        # kernel.hostname is namespaced, so this probe cannot touch the host even if it failed
        "sysctl write": "echo evil > /proc/sys/kernel/hostname",
        "host keyrings": "grep -q keyring /proc/keys",
        "umount proc mask": "umount /proc/sys",
    }
    for what, cmd in checks.items():
        res, out, err, _ = run(runtime, sid, cmd + " >/dev/null 2>&1; echo rc=$?")
        assert out != "rc=0\n", f"{what} was allowed (uid {uid})"
    assert run(runtime, sid, "hostname")[1] == "sandbox\n"
    _, out, _, _ = run(runtime, sid, "grep -E 'Cap(Eff|Prm|Bnd)|NoNewPrivs|Seccomp:' /proc/self/status")
    assert "0000000000000000" in out and "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    assert "Prm:\t0000000000000000" in out


def test_memory_limit_oom_kills_allocation(runtime, python_image):
    sid = create(runtime, image=python_image, mem_limit_mb=50)
    res, _, _, _ = run(runtime, sid, "python3 -c 'a=[]\nwhile True: a.append(bytearray(1<<20))'",
                       timeout_ms=30_000)
    assert res.exit_code == 137 and not res.timed_out
    assert runtime.cgroups.stats(sid).oom_kills >= 1
    assert run(runtime, sid, "echo ok")[1] == "ok\n"


def test_pids_limit_contains_fork_bomb(runtime):
    sid = create(runtime, pids_limit=20)
    res, out, _, _ = run(runtime, sid, "i=0; while [ $i -lt 60 ]; do sleep 20 & i=$((i+1)); done "
                                       ">/dev/null 2>&1; ps | wc -l", timeout_ms=20_000)
    assert runtime.cgroups.stats(sid).pids <= 20
    run(runtime, sid, "kill $(jobs -p) 2>/dev/null; true")


def test_workspace_is_bound_and_writable(runtime, data_dir):
    ws = data_dir / "workspaces" / "w1"
    ws.mkdir(parents=True)
    os.chown(ws, 65534, 65534)
    sid = create(runtime, workspace_dir=ws)
    run(runtime, sid, "echo data > /workspace/f.txt")
    assert (ws / "f.txt").read_text() == "data\n"
    runtime.destroy(sid)
    assert (ws / "f.txt").read_text() == "data\n"  # survives the sandbox


def test_readonly_rootfs(runtime):
    sid = create(runtime, readonly_rootfs=True, uid=0, gid=0)
    res, out, _, _ = run(runtime, sid, "touch /etc/x 2>&1; echo rc=$?; touch /tmp/x /workspace/x && echo ok")
    assert "rc=1" in out and "ok" in out


def test_teardown_leaves_nothing(runtime, cgroup_parent):
    sid = create(runtime)
    run(runtime, sid, "sleep 300 & sleep 301 &")
    obs = runtime.observe(sid)
    assert obs.healthy
    p = runtime.paths(sid)
    runtime.destroy(sid)
    assert not os.path.exists(f"/proc/{obs.pid}")
    assert not runtime.cgroups.exists(sid)
    assert not p.root.exists() and not p.run.exists()
    assert mounts_under(p.root) == []
    assert sid not in runtime.host_sessions()
    runtime.destroy(sid)  # idempotent


def test_survives_creator_sigkill_and_is_found_again(runtime, data_dir, cgroup_parent):
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from sandkasten.runtime.sandboxes import Runtime
        from sandkasten.runtime.spec import ExecRequest
        rt = Runtime.detect(Path({str(data_dir)!r}), cgroup_parent={cgroup_parent!r})
        rt.create(rt.spec("s-orphan", "base"))
        rt.exec("s-orphan", ExecRequest("first", "cd /tmp; export X=42; sleep 300 &"))
        print("ready", flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    time.sleep(0.1)
    obs = runtime.observe("s-orphan")
    assert obs.healthy, obs
    res, out, _, _ = run(runtime, "s-orphan", "echo $X; pwd; jobs | wc -l")
    assert out.split() == ["42", "/tmp", "1"]


def test_bad_input_leaves_nothing(runtime, data_dir):
    with pytest.raises(ImageNotFound):
        runtime.spec("s-bad1", "no-such-image")
    for bad in ({"mem_limit_mb": 0}, {"pids_limit": -1}, {"cpu_limit": 0}, {"cpu_limit": -0.5}):
        with pytest.raises(InvalidRequest):
            runtime.create(runtime.spec("s-bad2", "base", **bad))
    with pytest.raises(InvalidRequest):
        runtime.spec("../etc", "base")
    noshell = data_dir / "images-extra"
    (data_dir / "images").unlink()
    (data_dir / "images").mkdir()
    root = data_dir / "images" / "empty" / "rootfs"
    (root / "bin").mkdir(parents=True)
    (data_dir / "images" / "empty" / "image.json").write_text('{"name": "empty"}')
    with pytest.raises(ImageInvalid):
        runtime.spec("s-bad3", "empty")
    assert runtime.host_sessions() == set()
    assert not noshell.exists()


def test_exec_ids_are_run_once(runtime):
    sid = create(runtime)
    first = runtime.exec(sid, ExecRequest("once", "echo x >> /workspace/count"))
    again = runtime.exec(sid, ExecRequest("once", "echo x >> /workspace/count"))
    assert first == again
    assert run(runtime, sid, "wc -l < /workspace/count")[1].strip() == "1"
