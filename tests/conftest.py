"""Shared fixtures and the test tiers.

Tiers: every test is marked `unit` or `system` here, from the fixtures it uses (below:
SYSTEM_FIXTURES), so a test cannot be filed in the wrong tier by hand. `make test` runs the
unit tier first, then the system tier in parallel workers (pytest-xdist), so every resource a
system fixture makes is unique per worker process: the cgroup parent is named after the
worker's pid, each worker starts its own PostgreSQL and Chromium, data dirs live in the
worker's own tmp_path, daemons take a free loopback port. The one thing workers share is
the stock image cache, built once under a file lock (`built_once`).

Fixtures: one cgroup parent per worker (removed at the end, also on failure), stock images
built once into a cache, a fresh data dir per test, real daemons, a PostgreSQL server.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sandkasten.errors import SandboxError
from sandkasten.images.build import build
from sandkasten.images.store import ImageStore
from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime.sandboxes import Runtime

REPO = Path(__file__).resolve().parent.parent
IMAGE_CACHE = Path(os.environ.get("SK_TEST_IMAGES", REPO / ".cache" / "images"))
TOOLS_IMAGE_CACHE = REPO / ".cache" / "images"  # where tools/crashtest and tools/bench look
CGROUP_PARENT = f"sandkasten-test-{os.getpid()}"  # one per xdist worker: workers are processes

# A test that uses any of these (directly or through another fixture: data_dir, runtime,
# daemon_factory, daemon, pg_database, ... all stand on them) runs in the system tier: it
# needs this host as root (cgroups, namespaces, mounts, images), PostgreSQL or Chromium.
# Everything else is the unit tier: in process, on tmp files and loopback only.
SYSTEM_FIXTURES = frozenset({
    "cgroup_parent",  # real cgroups: runtime, daemon_factory, daemon
    "image_store",    # the stock images: data_dir, python_image
    "pg_server",      # a PostgreSQL server: pg_database, journal_target[postgres]
    "privileged",     # a test that changes the host as root by itself (below)
    "host_tools",     # tools/crashtest and tools/bench, whole daemons in subprocesses
    "browser",        # Chromium (tests/test_console.py)
})


def tier(item: pytest.Item) -> str:
    if item.get_closest_marker("system") or SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "system"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before `-m unit` / `-m system` selects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier(item))


@contextmanager
def built_once(cache: Path) -> Iterator[None]:
    """Hold the build lock of image cache CACHE: xdist workers (and other test runs on this
    machine) asking for the same image at once build it once; the others wait, then find it.
    The lock is a file in the temp dir named after the cache's path, never inside the cache
    (the store lists every entry of its dir)."""
    key = hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"sandkasten-test-images-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def privileged() -> None:
    """The test changes this host as root by itself: real cgroups, mount or network
    namespaces, mounts, chroot. Skipped when not root; puts the test in the system tier."""
    if os.geteuid() != 0:
        pytest.skip("changes the host: needs root")


@pytest.fixture(scope="session")
def host_tools(privileged) -> Path:
    """tools/crashtest and tools/bench as a test runs them (root, from the repo): they build
    the base image into the repo's cache when it is missing, so it is built here first, under
    the build lock, and two workers running tools at once never both build it."""
    TOOLS_IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with built_once(TOOLS_IMAGE_CACHE):
        build(ImageStore(TOOLS_IMAGE_CACHE), "base")
    return REPO / "tools"


@pytest.fixture(scope="session")
def cgroup_parent():
    # a run killed before its finalizers (a SIGKILLed pytest) left its parents: remove those
    # of runs whose process is gone (never a live run's; workers may race for the same one)
    for prefix in ("sandkasten-test-", "sandkasten-cgtest-"):
        for name in cgroups_mod.orphaned_run_parents(prefix):
            try:
                cgroups_mod.detect(parent=name).destroy_parent()
            except SandboxError:
                pass   # another worker removed it first, or it is stuck: the next run tries again
    yield CGROUP_PARENT
    cgroups_mod.detect(parent=CGROUP_PARENT).destroy_parent()


@pytest.fixture(scope="session")
def image_store() -> ImageStore:
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    store = ImageStore(IMAGE_CACHE)
    with built_once(IMAGE_CACHE):
        build(store, "base")
    return store


@pytest.fixture(scope="session")
def python_image(image_store) -> str:
    """The python image, built by debootstrap (about a minute) only when the cache lacks it."""
    with built_once(IMAGE_CACHE):
        build(image_store, "python", progress=lambda msg: print(msg, flush=True))
    return "python"


@pytest.fixture
def data_dir(tmp_path, image_store) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "images").symlink_to(IMAGE_CACHE)
    return d


@pytest.fixture
def runtime(data_dir, cgroup_parent):
    rt = Runtime.detect(data_dir, cgroup_parent=cgroup_parent)
    yield rt
    try:
        rt.remove_all()
    finally:
        rt.close()


@pytest.fixture
def daemon_factory(tmp_path, image_store, cgroup_parent):
    from tests.daemons import DaemonProc, make_data_dir

    made = []

    def make(data_dir: Path | None = None, **overrides) -> DaemonProc:
        d = DaemonProc(make_data_dir(data_dir.parent if data_dir else tmp_path, IMAGE_CACHE),
                       cgroup_parent, **overrides)
        made.append(d)
        return d

    yield make
    errors = []
    for d in made:  # every daemon is closed, also when closing an earlier one failed
        try:
            d.close()
        except Exception as e:  # noqa: BLE001 - raised below, after the others are closed
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server per worker process (tests/pg.py: its own temp dir and
    loopback port), stopped and removed after."""
    from tests.pg import PgServer

    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database(pg_server) -> str:
    """The URL of a fresh, empty database on the test server."""
    return pg_server.database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.system)])
def journal_target(request, tmp_path):
    """Where a journal lives, once per backend: a SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "state" / "sandkasten.db"
    return request.getfixturevalue("pg_database")
