"""Config of a cluster host: the journal URL, host id and timing keys, refused clearly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sandkasten import config
from sandkasten.errors import ConfigError

URL = "postgresql+psycopg://sk:pw@db.internal:5432/sandkasten"


def test_journal_url_or_database_url_names_the_shared_journal():
    cfg = config.from_mapping({"journal": {"url": URL}, "cluster": {"host_id": "n1"}})
    assert (cfg.journal_target, cfg.shared_journal, cfg.host_id) == (URL, True, "n1")
    assert config.from_mapping({"database_url": URL}).journal_target == URL
    assert cfg.advertise_address == "http://127.0.0.1:8080"
    plain = config.from_mapping({"data_dir": "/srv/sk"})
    assert (plain.journal_target, plain.shared_journal) == (Path("/srv/sk/sandkasten.db"), False)
    assert plain.host_id == socket.gethostname()
    assert config.from_mapping({"journal": {"url": "sqlite:////tmp/j.db"}}).journal_target == Path("/tmp/j.db")
    env = config.load(None, env={"SANDKASTEN_JOURNAL__URL": URL, "SANDKASTEN_CLUSTER__HOST_ID": "n2"})
    assert (env.journal_target, env.host_id) == (URL, "n2")


@pytest.mark.parametrize("raw, message", [
    ({"journal": {"url": "mysql://u:hunter2@x/y"}}, "invalid config key journal.url: expected sqlite:///PATH"),
    ({"journal": {"url": URL}, "database_url": URL.replace("5432", "5433")}, "database_url: differs from journal.url"),
    ({"cluster": {"host_id": "a/b"}}, "cluster.host_id"),
    ({"cluster": {"heartbeat_seconds": 5, "host_timeout_seconds": 6}}, "at least twice"),
    ({"cluster": {"advertise_address": "127.0.0.1:80"}}, "cluster.advertise_address"),
    ({"cluster": {"max_sessions": 0}}, "cluster.max_sessions: must be greater than zero"),
    ({"journal": {"url": URL}, "pool": {"enabled": True}}, "pool.enabled: the pre-warmed pool is not supported"),
])
def test_bad_cluster_config_is_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.from_mapping(raw)
    assert "hunter2" not in info.value.message
