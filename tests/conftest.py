"""Shared fixtures: one cgroup parent per test run (removed at the end, also on failure),
stock images built once into a cache, and a fresh data dir per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandkasten.images.build import build
from sandkasten.images.store import ImageStore
from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime.sandboxes import Runtime

REPO = Path(__file__).resolve().parent.parent
IMAGE_CACHE = Path(os.environ.get("SK_TEST_IMAGES", REPO / ".cache" / "images"))
CGROUP_PARENT = f"sandkasten-test-{os.getpid()}"


@pytest.fixture(scope="session")
def cgroup_parent():
    yield CGROUP_PARENT
    cgroups_mod.detect(parent=CGROUP_PARENT).destroy_parent()


@pytest.fixture(scope="session")
def image_store() -> ImageStore:
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    store = ImageStore(IMAGE_CACHE)
    build(store, "base")
    return store


@pytest.fixture(scope="session")
def python_image(image_store) -> str:
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
    for sid in rt.host_sessions():
        rt.destroy(sid)
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
    for d in made:
        d.close()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the run (tests/pg.py), stopped and removed after."""
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


@pytest.fixture(params=["sqlite", "postgres"])
def journal_target(request, tmp_path):
    """Where a journal lives, once per backend: a SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "state" / "sandkasten.db"
    return request.getfixturevalue("pg_database")
