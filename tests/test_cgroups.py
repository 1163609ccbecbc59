"""cgroups against the real kernel of this host (hybrid here; the same contract runs on a pure
v2 host, only the limit files read back differ). Everything lives under one parent per test
run, `sandkasten-test-<pid>`, removed by a session finalizer even when tests fail; processes
are ones these tests start, killed by pid. The v2 layout's files are checked in
test_cgroups_v2.py against a directory laid out like cgroupfs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandkasten.errors import InvalidRequest, SandboxError
from sandkasten.runtime.cgroups import Cgroups, Limits, check_name, detect, orphaned_run_parents, read_keyed, wait_until

MB = 1024 * 1024
_names = itertools.count()


# -- pure: validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mem_bytes": 0},
        {"mem_bytes": -1},
        {"pids": 0},
        {"pids": -5},
        {"cpu": 0},
        {"cpu": -0.5},
        {"cpu": float("nan")},
        {"cpu": float("inf")},
        {"cpu": 0.001},
        {"mem_bytes": 1.5},
        {"pids": True},
        {"cpu": "1"},
    ],
)
def test_bad_limits_are_refused(kwargs):
    values = {"mem_bytes": 64 * MB, "pids": 32, "cpu": 0.5} | kwargs
    with pytest.raises(InvalidRequest):
        Limits(**values)


def test_good_limits_give_quota_per_period():
    assert Limits(mem_bytes=MB, pids=1, cpu=0.5).cpu_quota_us == 50_000
    assert Limits(mem_bytes=MB, pids=1, cpu=2).cpu_quota_us == 200_000


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", ".hidden", "-x", "a b", "x" * 129, None])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_bad_parent_is_refused(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    with pytest.raises(InvalidRequest):
        detect(tmp_path, parent="../etc")


def test_detect_refuses_unknown_layout(tmp_path):
    with pytest.raises(SandboxError, match="unable to detect cgroups"):
        detect(tmp_path)


# -- real kernel -----------------------------------------------------------------------------


def new_parent(request, suffix: str = "") -> Cgroups:
    if os.geteuid() != 0:
        pytest.skip("real cgroups need root")
    try:
        cgroups = detect(parent=f"sandkasten-cgtest-{os.getpid()}{suffix}")
    except SandboxError as e:
        pytest.skip(str(e))
    request.addfinalizer(cgroups.destroy_parent)  # registered before anything exists
    cgroups.ensure_parent()
    return cgroups


@pytest.fixture(scope="session")
def cgroups(request, privileged) -> Cgroups:
    return new_parent(request)


@pytest.fixture
def name(cgroups) -> str:
    return f"t{next(_names)}"


@pytest.fixture
def started():
    """Processes a test starts; killed by pid and reaped afterwards, whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def start_inside(started, cgroups: Cgroups, name: str, *argv: str) -> subprocess.Popen:
    """Start argv as the spawner would: the child writes itself into every cgroup.procs,
    then execs, so nothing runs outside the group's limits."""
    enter = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 99; shift; done; shift; exec "$@"'
    paths = [str(p) for p in cgroups.procs_paths(name)]
    proc = subprocess.Popen(
        ["sh", "-c", enter, "sh", *paths, "--", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(proc)
    return proc


def start_sleep(started) -> subprocess.Popen:
    proc = subprocess.Popen(["sleep", "300"])
    started.append(proc)
    return proc


def group_dirs(cgroups: Cgroups, name: str) -> list[Path]:
    return [p.parent for p in cgroups.procs_paths(name)]


def test_detect_finds_hybrid_on_this_host(cgroups):
    if not Path("/sys/fs/cgroup/unified").is_dir():
        pytest.skip("not a hybrid host")
    assert cgroups.kind == "hybrid"


def test_create_writes_limits_and_is_idempotent(cgroups, name):
    def limit_files() -> dict[str, str]:
        if cgroups.kind == "hybrid":
            root = Path("/sys/fs/cgroup")
            memory = root / "memory" / cgroups.parent / name
            files = {
                "mem": memory / "memory.limit_in_bytes",
                "pids": root / "pids" / cgroups.parent / name / "pids.max",
                "quota": root / "cpu" / cgroups.parent / name / "cpu.cfs_quota_us",
                "period": root / "cpu" / cgroups.parent / name / "cpu.cfs_period_us",
            }
            if (memory / "memory.memsw.limit_in_bytes").exists():
                files["memsw"] = memory / "memory.memsw.limit_in_bytes"
        else:
            group = Path("/sys/fs/cgroup") / cgroups.parent / name
            files = {"mem": group / "memory.max", "pids": group / "pids.max", "cpu": group / "cpu.max"}
        return {key: path.read_text().strip() for key, path in files.items()}

    def expected(mem: int, pids: int, quota: int) -> dict[str, str]:
        if cgroups.kind == "hybrid":
            values = {"mem": str(mem), "pids": str(pids), "quota": str(quota), "period": "100000"}
            if "memsw" in limit_files():
                values["memsw"] = str(mem)
            return values
        return {"mem": str(mem), "pids": str(pids), "cpu": f"{quota} 100000"}

    cgroups.create(name, Limits(mem_bytes=64 * MB, pids=32, cpu=0.5))
    assert cgroups.exists(name)
    assert limit_files() == expected(64 * MB, 32, 50_000)

    cgroups.create(name, Limits(mem_bytes=256 * MB, pids=64, cpu=2))  # raising: memsw first
    assert limit_files() == expected(256 * MB, 64, 200_000)

    cgroups.create(name, Limits(mem_bytes=32 * MB, pids=8, cpu=0.25))  # lowering: limit first
    assert limit_files() == expected(32 * MB, 8, 25_000)
    assert name in cgroups.names()


def test_attach_stats_kill_remove(cgroups, name, started):
    cgroups.create(name, Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    proc = start_sleep(started)
    cgroups.attach(name, proc.pid)

    assert cgroups.pids(name) == [proc.pid]
    assert cgroups.populated(name)
    stats = cgroups.stats(name)
    assert stats.memory_limit == 64 * MB
    assert stats.pids == 1
    assert stats.memory_bytes >= 0 and stats.cpu_usage_usec >= 0
    assert stats.oom_kills == 0

    cgroups.kill(name)
    assert not cgroups.populated(name)
    assert cgroups.pids(name) == []
    assert proc.wait(timeout=10) == -9

    cgroups.remove(name)
    assert not cgroups.exists(name)
    assert not any(d.exists() for d in group_dirs(cgroups, name))
    assert name not in cgroups.names()


def test_child_writes_itself_into_procs_paths(cgroups, name, started):
    cgroups.create(name, Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    proc = start_inside(started, cgroups, name, "sleep", "300")
    assert wait_until(lambda: cgroups.pids(name) == [proc.pid], 10)
    cgroups.kill(name)
    assert proc.wait(timeout=10) == -9
    cgroups.remove(name)


def test_memory_limit_oom_kills_an_allocation(cgroups, name, started):
    cgroups.create(name, Limits(mem_bytes=50 * MB, pids=32, cpu=1))
    allocate = "b = bytearray(200 * 1024 * 1024); print(len(b))"
    proc = start_inside(started, cgroups, name, sys.executable, "-c", allocate)
    assert proc.wait(timeout=60) == -9
    assert cgroups.stats(name).oom_kills >= 1
    cgroups.kill(name)
    cgroups.remove(name)


def test_pids_limit_contains_a_fork_bomb(cgroups, name, started):
    cgroups.create(name, Limits(mem_bytes=256 * MB, pids=20, cpu=1))
    bomb = "i=0; while [ $i -lt 200 ]; do sleep 300 & i=$((i+1)); done; wait"
    proc = start_inside(started, cgroups, name, "sh", "-c", bomb)
    events = next(d / "pids.events" for d in group_dirs(cgroups, name) if (d / "pids.events").exists())
    seen: list[int] = []

    def sample_until_refused() -> bool:  # until the kernel refused a fork: the bomb hit the ceiling
        seen.append(cgroups.stats(name).pids)
        return read_keyed(events)["max"] >= 1

    assert wait_until(sample_until_refused, 30)
    seen.extend(cgroups.stats(name).pids for _ in range(20))
    assert max(seen) <= 20
    assert len(cgroups.pids(name)) <= 20
    cgroups.kill(name)
    assert proc.wait(timeout=10) in (-9, 0, 2)  # killed, or the shell gave up on fork failure
    assert cgroups.pids(name) == []
    cgroups.remove(name)


def test_kill_signals_processes_outside_the_lifecycle_tree(cgroups, name, started):
    """A process written into one hierarchy only (a half-done attach) is not reached by
    cgroup.kill in the v2 tree; kill falls back to SIGKILL by pid."""
    cgroups.create(name, Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    proc = start_sleep(started)
    cgroups.procs_paths(name)[0].write_text(str(proc.pid))
    cgroups.kill(name, timeout=0.2)
    assert proc.wait(timeout=10) == -9
    assert cgroups.pids(name) == []
    cgroups.remove(name)


def test_remove_of_a_busy_group_names_path_and_errno(cgroups, name, started):
    cgroups.create(name, Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    proc = start_sleep(started)
    cgroups.attach(name, proc.pid)
    with pytest.raises(SandboxError) as refused:
        cgroups.remove(name)
    assert "EBUSY" in refused.value.message
    assert f"{cgroups.parent}/{name}" in refused.value.message
    cgroups.kill(name)
    cgroups.remove(name)
    assert not cgroups.exists(name)


def test_missing_group_is_quiet_where_it_should_be(cgroups, name):
    assert not cgroups.exists(name)
    assert not cgroups.populated(name)
    assert cgroups.pids(name) == []
    cgroups.kill(name)
    cgroups.remove(name)
    with pytest.raises(SandboxError, match="ENOENT"):
        cgroups.stats(name)


def test_bad_names_never_reach_the_filesystem(cgroups):
    for bad in ["../x", "a/b", ""]:
        with pytest.raises(InvalidRequest):
            cgroups.create(bad, Limits(mem_bytes=64 * MB, pids=32, cpu=1))
        with pytest.raises(InvalidRequest):
            cgroups.remove(bad)
        with pytest.raises(InvalidRequest):
            cgroups.kill(bad)


def test_destroy_parent_kills_and_removes_everything(request, privileged, started):
    cgroups = new_parent(request, "-destroy")
    cgroups.create("a", Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    cgroups.create("b", Limits(mem_bytes=64 * MB, pids=32, cpu=1))
    inside = start_sleep(started)
    cgroups.attach("a", inside.pid)
    stray = start_sleep(started)  # written straight into the parent, as a bug might
    if cgroups.kind == "hybrid":  # (v2 refuses processes in a parent that delegates controllers)
        for parent_procs in {p.parent.parent / "cgroup.procs" for p in cgroups.procs_paths("a")}:
            parent_procs.write_text(str(stray.pid))
    else:
        stray.kill()
    assert cgroups.names() == ["a", "b"]

    cgroups.destroy_parent()

    assert inside.wait(timeout=10) == -9
    assert stray.wait(timeout=10) == -9
    parents = {d.parent for d in group_dirs(cgroups, "a")}
    assert not any(p.exists() for p in parents)
    cgroups.destroy_parent()  # again: nothing left, nothing to do


def test_release_parent_removes_only_an_empty_parent_and_create_brings_it_back(request, privileged):
    cgroups = new_parent(request, "-release")
    cgroups.create("held", Limits(mem_bytes=64 << 20, pids=16, cpu=0.5))
    assert cgroups.release_parent() is False  # a sandbox's group is still in it
    assert all(d.is_dir() for d in cgroups._dirs("held"))
    cgroups.remove("held")
    assert cgroups.release_parent() is True
    assert not any(d.exists() for d in cgroups._dirs())
    cgroups.create("again", Limits(mem_bytes=64 << 20, pids=16, cpu=0.5))  # a daemon sharing the parent
    assert all(d.is_dir() for d in cgroups._dirs("again"))
    cgroups.remove("again")


def test_orphaned_run_parents_are_only_dead_runs_of_that_shape(tmp_path):
    """What a killed test or bench run left: `<prefix><pid>[-…]` of a process that is gone, in
    any hierarchy; never a live process's, never another name."""
    child = subprocess.Popen(["true"])
    child.wait()
    dead, live = child.pid, os.getpid()
    for path in (f"unified/sandkasten-test-{dead}", f"memory/sandkasten-test-{dead}",
                 f"sandkasten-bench-{dead}-main", f"sandkasten-test-{live}", "sandkasten-test-abc",
                 f"sandkasten-testx-{dead}", f"unified/sandkasten-test-{dead}x", "sandkasten"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "memory" / f"sandkasten-test-{dead}0").touch()   # a file, not a group
    assert orphaned_run_parents("sandkasten-test-", tmp_path) == [f"sandkasten-test-{dead}"]
    assert orphaned_run_parents("sandkasten-bench-", tmp_path) == [f"sandkasten-bench-{dead}-main"]
