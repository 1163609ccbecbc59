"""The v2 backend against a directory laid out like a cgroup2 mount. The backend only reads and
writes files (plus mkdir/rmdir), so the fake is plain files: `kernel_mkdir` pre-creates a group
with the control files the kernel would create, which a plain mkdir would not. No pid in here
is real: the fake must never lead `kill` to signal anything (see NOT_A_PID)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sandkasten.errors import SandboxError
from sandkasten.runtime.cgroups import Limits, Stats, V2Cgroups, detect

MB = 1024 * 1024
NOT_A_PID = 99_999_999  # above the kernel's largest pid_max (2**22)
PARENT = "sandkasten"

GROUP_FILES = {
    "cgroup.controllers": "memory pids cpu\n",
    "cgroup.subtree_control": "",
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.kill": "",
    "cgroup.freeze": "0\n",
    "memory.current": "0\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "pids.max": "max\n",
    "pids.current": "0\n",
}


def kernel_mkdir(group: Path, skip: tuple[str, ...] = ()) -> Path:
    group.mkdir()
    for file, text in GROUP_FILES.items():
        if file not in skip:
            (group / file).write_text(text)
    return group


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.procs").write_text("1\n")
    kernel_mkdir(tmp_path / PARENT)
    return tmp_path


@pytest.fixture
def cgroups(root) -> V2Cgroups:
    cgroups = detect(root, PARENT)
    assert isinstance(cgroups, V2Cgroups)
    return cgroups


def group(root: Path, name: str) -> Path:
    return kernel_mkdir(root / PARENT / name)


def test_detect_picks_v2(cgroups):
    assert cgroups.kind == "v2"
    assert cgroups.parent == PARENT


def test_ensure_parent_delegates_controllers_and_leaves_root_alone(root, cgroups):
    cgroups.ensure_parent()
    assert (root / PARENT / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / "cgroup.subtree_control").read_text() == "cpuset cpu io memory pids\n"


def test_ensure_parent_writes_only_what_the_root_lacks(root, cgroups):
    (root / "cgroup.subtree_control").write_text("cpu io\n")
    (root / PARENT / "cgroup.subtree_control").write_text("memory\n")
    cgroups.ensure_parent()
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (root / PARENT / "cgroup.subtree_control").read_text() == "+pids +cpu"


def test_ensure_parent_refuses_missing_controllers(root, cgroups):
    (root / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(SandboxError, match="controllers memory pids not available"):
        cgroups.ensure_parent()


def test_backend_never_creates_control_files(tmp_path):
    """A plain directory is not a cgroup: writing its control files fails instead of
    leaving regular files behind."""
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids cpu\n")
    with pytest.raises(SandboxError, match="ENOENT"):
        detect(tmp_path, PARENT).ensure_parent()
    assert list((tmp_path / PARENT).iterdir()) == []


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (Limits(mem_bytes=50 * MB, pids=20, cpu=0.5), ("52428800", "0", "20", "50000 100000")),
        (Limits(mem_bytes=MB, pids=1, cpu=2), ("1048576", "0", "1", "200000 100000")),
        (Limits(mem_bytes=MB, pids=1, cpu=0.01), ("1048576", "0", "1", "1000 100000")),
    ],
)
def test_create_writes_limits(root, cgroups, limits, expected):
    g = group(root, "s1")
    cgroups.create("s1", limits)
    cgroups.create("s1", limits)  # idempotent
    files = ("memory.max", "memory.swap.max", "pids.max", "cpu.max")
    assert tuple((g / f).read_text() for f in files) == expected


def test_create_without_swap_accounting_skips_swap(root, cgroups):
    g = kernel_mkdir(root / PARENT / "s1", skip=("memory.swap.max",))
    cgroups.create("s1", Limits(mem_bytes=50 * MB, pids=20, cpu=0.5))
    assert not (g / "memory.swap.max").exists()
    assert (g / "memory.max").read_text() == "52428800"


def test_stats_parse_kernel_files(root, cgroups):
    g = group(root, "s1")
    (g / "memory.current").write_text("12345678\n")
    (g / "memory.max").write_text("52428800\n")
    (g / "cpu.stat").write_text("usage_usec 777\nuser_usec 700\nsystem_usec 77\nnr_periods 3\n")
    (g / "pids.current").write_text("3\n")
    (g / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert cgroups.stats("s1") == Stats(
        memory_bytes=12345678, memory_limit=52428800, cpu_usage_usec=777, pids=3, oom_kills=2
    )


def test_stats_without_memory_limit_report_zero(root, cgroups):
    group(root, "s1")
    assert cgroups.stats("s1").memory_limit == 0


def test_attach_writes_the_pid_and_procs_paths_name_the_file(root, cgroups):
    g = group(root, "s1")
    assert cgroups.procs_paths("s1") == [g / "cgroup.procs"]
    cgroups.attach("s1", NOT_A_PID)
    assert (g / "cgroup.procs").read_text() == str(NOT_A_PID)
    assert cgroups.pids("s1") == [NOT_A_PID]


def test_populated_reads_cgroup_events(root, cgroups):
    g = group(root, "s1")
    assert cgroups.exists("s1")
    assert not cgroups.populated("s1")
    (g / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert cgroups.populated("s1")
    assert not cgroups.exists("s2") and not cgroups.populated("s2")


def test_kill_writes_cgroup_kill_and_waits_for_empty(root, cgroups):
    g = group(root, "s1")
    (g / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    # the "kernel" empties the group a moment after cgroup.kill was written
    emptied = threading.Timer(0.05, (g / "cgroup.events").write_text, ["populated 0\nfrozen 0\n"])
    emptied.start()
    try:
        cgroups.kill("s1", timeout=30)
    finally:
        emptied.join()
    assert (g / "cgroup.kill").read_text() == "1"


def test_kill_gives_up_on_a_group_that_stays_populated(root, cgroups):
    g = group(root, "s1")
    (g / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    with pytest.raises(SandboxError, match=f"unable to kill cgroup .*{PARENT}/s1: still populated"):
        cgroups.kill("s1", timeout=0.01)


def test_kill_of_a_missing_group_does_nothing(root, cgroups):
    cgroups.kill("gone")
    assert not (root / PARENT / "gone").exists()


def test_names_lists_child_groups_only(root, cgroups):
    group(root, "b2")
    group(root, "a1")
    (root / PARENT / ".trash").mkdir()
    assert cgroups.names() == ["a1", "b2"]


def test_remove_error_names_path_and_errno(root, cgroups):
    # A fake group holds regular files, which a real cgroupfs rmdir would take along;
    # here rmdir fails, which shows how failures read.
    group(root, "s1")
    with pytest.raises(SandboxError) as refused:
        cgroups.remove("s1")
    assert refused.value.message == f"unable to remove cgroup {root / PARENT / 's1'}: ENOTEMPTY"
    assert refused.value.details["path"] == str(root / PARENT / "s1")


def test_remove_of_a_missing_group_does_nothing(cgroups):
    cgroups.remove("gone")


def test_release_parent_leaves_a_parent_with_groups_and_create_restores_it(root, cgroups):
    group(root, "s-1")
    assert cgroups.release_parent() is False
    assert (root / PARENT / "s-1").is_dir()
    assert (root / "cgroup.procs").read_text() == "1\n"  # the root is never touched
