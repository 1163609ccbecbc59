"""The shell's status channel (issue 15): what a command, its background jobs or any other
process in the sandbox write cannot become an exec's result."""

from __future__ import annotations

import pytest

from sandkasten.runtime.spec import ExecRequest

# every fd a shell might keep a copy of its status channel on, tried from a forked subshell
SPRAY = ("for fd in 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 30 31 63 255; do "
         "printf '%s 0 /fake\\n' {eid} >&$fd; done 2>/dev/null")


@pytest.fixture(params=["base", "python"])
def image(request):
    if request.param == "python":
        return request.getfixturevalue("python_image")
    return request.param


def run(rt, sid, eid, cmd, timeout_ms=20_000):
    res = rt.exec(sid, ExecRequest(eid, cmd, timeout_ms=timeout_ms))
    out, _, _, _ = rt.read_output(sid, eid)
    return res, out.decode()


def test_a_subshell_cannot_report_its_own_exec_as_done(runtime, image):
    sid = f"s-forge-own-{image}"
    runtime.create(runtime.spec(sid, image))
    res, out = run(runtime, sid, "x-own", f"( {SPRAY.format(eid='x-own')} ); sleep 0.3; cd /tmp; echo real; false")
    assert (res.exit_code, res.cwd) == (1, "/tmp"), res
    assert out.endswith("real\n"), out


def test_a_background_job_cannot_answer_the_next_exec(runtime, image):
    """A job left behind by one exec answers the next one (exit 0, a fake cwd, invented output)
    while that one has not even begun: the next exec must run for real."""
    sid = f"s-forge-next-{image}"
    runtime.create(runtime.spec(sid, image))
    run(runtime, sid, "x-plant", f"( sleep 0.5; {SPRAY.format(eid='x-victim')}; echo invented ) &")
    res, out = run(runtime, sid, "x-victim", "sleep 1.5; touch /tmp/ran; echo real; cd /workspace; (exit 3)")
    assert (res.exit_code, res.cwd) == (3, "/workspace"), res
    assert out.endswith("real\n"), out
    assert run(runtime, sid, "x-check", "test -e /tmp/ran && echo ran")[1] == "ran\n"


def test_the_reported_cwd_is_the_shells_real_one(runtime, image):
    """The shell says where it is; the runner believes only what the kernel confirms."""
    sid = f"s-forge-cwd-{image}"
    runtime.create(runtime.spec(sid, image))
    res, _ = run(runtime, sid, "x-cd", "mkdir -p /tmp/a && cd /tmp/a && PWD=/etc")
    assert res.cwd == "/tmp/a"
    res, _ = run(runtime, sid, "x-rm", "rmdir /tmp/a")
    assert res.cwd in ("/tmp/a", "/")  # a deleted directory is named as the shell knew it, never invented


def test_a_timeout_also_ends_what_the_command_moved_into_a_new_session(runtime):
    """`setsid` takes a loop out of the shell's process group: the timeout must end it anyway,
    and leave alone a background job an earlier command started."""
    sid = "s-setsid-timeout"
    runtime.create(runtime.spec(sid, "base"))
    run(runtime, sid, "x-earlier", "sleep 300 & sleep 0.1")  # started well before (clock ticks are 10 ms)
    res, _ = run(runtime, sid, "x-loop", "setsid sh -c 'while true; do sleep 0.2; done # sk-marker-loop' & "
                 "setsid sh -c 'while true; do sleep 0.2; done # sk-marker-fg'", timeout_ms=1000)
    assert res.timed_out
    _, left = run(runtime, sid, "x-ps", "sleep 0.5; grep -l 'sk-marke[r]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l; "
                  "grep -l 'sleep.30[0]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")
    assert left.split() == ["0", "1"], left
