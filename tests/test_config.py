"""Config checks: a cgroup_parent that is not one plain directory name, keys that were removed, and
wrong values (in the file or the environment) refused through the schema naming the key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sandkasten import config
from sandkasten.errors import ConfigError


@pytest.mark.parametrize("value", ["..", "a..b", "x..", "/sys/fs/cgroup", "a//b", "a/", "/", ".hidden", "a/b", "-x"])
def test_cgroup_parent_that_is_not_one_directory_name_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^invalid config key cgroup_parent: expected one directory name") as e:
        config.from_mapping({"cgroup_parent": value})
    assert repr(value) in str(e.value)
    env = {"SANDKASTEN_CGROUP_PARENT": value}
    with pytest.raises(ConfigError, match=r"^invalid config key cgroup_parent"):
        config.load(None, env=env)


@pytest.mark.parametrize("value", ["", "sandkasten-ci", "sk_1.2", "A"])
def test_cgroup_parent_plain_names_and_empty_are_accepted(value):
    assert config.from_mapping({"cgroup_parent": value}).cgroup_parent == value


@pytest.mark.parametrize("section, key", [("reconcile", "resync_seconds"), ("workspace", "persist_by_default")])
def test_removed_keys_are_refused_with_a_message_that_says_they_were_removed(section, key):
    with pytest.raises(ConfigError, match=rf"^config key '{section}.{key}' was removed, it had no effect: .+; "
                                          r"delete it from the config$"):
        config.from_mapping({section: {key: 1}})
    with pytest.raises(ConfigError, match=rf"^config key '{section}.{key}' was removed"):
        config.load(None, env={f"SANDKASTEN_{section.upper()}__{key.upper()}": "1"})
    assert not hasattr(getattr(config.from_mapping({}), section), key)


def test_the_shipped_config_loads():
    cfg = config.load("sandkasten.yaml", env={})
    assert cfg.reconcile.lost_sandbox_policy in config.LOST_SANDBOX_POLICIES


# ---------------------------------------------------------------- through the schema (msgspec)

@pytest.mark.parametrize("yaml_text, message", [
    ("defaults:\n  mem_limit_mb: abc\n", "invalid config key defaults.mem_limit_mb: expected an integer (got 'abc')"),
    ("defaults:\n  cpu_limit: lots\n", "invalid config key defaults.cpu_limit: expected a number (got 'lots')"),
    ("defaults:\n  cpu_limit: .inf\n", "invalid config key defaults.cpu_limit: expected a finite number (got inf)"),
    ("limits:\n  max_body_bytes: 99999999999999999999\n",
     f"invalid config key limits.max_body_bytes: too large (at most {2**53}) (got 99999999999999999999)"),
    ("workspace:\n  enabled: sometimes\n", "invalid config key workspace.enabled: expected true or false (got 'sometimes')"),
    ("network:\n  dns: [1]\n", "invalid config key network.dns: expected a list of strings (got [1])"),
    ("pool:\n  images: {base: -1}\n",
     "invalid config key pool.images: count for 'base' must be a non-negative integer (got {'base': -1})"),
    ("data_dir: ''\n", "invalid config key data_dir: expected a path (got '')"),
    ("api_key: [a]\n", "invalid config key api_key: expected a string (got ['a'])"),
    ("journal: 3\n", "invalid config key journal: must be a mapping"),
    ("journal:\n  colour: blue\n", "unknown config key 'journal.colour'"),
    ("colour: blue\n", "unknown config key 'colour'"),
])
def test_a_wrong_value_in_the_file_is_refused_naming_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "sandkasten.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        config.load(path, env={})
    assert e.value.message == message


@pytest.mark.parametrize("name, value, message", [
    ("SANDKASTEN_DEFAULTS__MEM_LIMIT_MB", "abc", "invalid config key defaults.mem_limit_mb: expected an integer (got 'abc')"),
    ("SANDKASTEN_DEFAULTS_PIDS_LIMIT", "1.5", "invalid config key defaults.pids_limit: expected an integer (got 1.5)"),
    ("SANDKASTEN_AUDIT__RECORD_INPUT", "maybe", "invalid config key audit.record_input: expected true or false (got 'maybe')"),
    ("SANDKASTEN_SESSION_TTL_SECONDS", "[abc", "invalid config key session_ttl_seconds: expected an integer (got '[abc')"),
    ("SANDKASTEN_NETWORK__COLOUR", "blue", "unknown config key from environment SANDKASTEN_NETWORK__COLOUR"),
])
def test_a_wrong_value_in_the_environment_is_refused_naming_the_key(name, value, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, env={name: value})
    assert e.value.message == message


def test_values_are_read_as_people_write_them():
    cfg = config.load(None, env={"SANDKASTEN_DEFAULTS__READONLY_ROOTFS": "yes", "SANDKASTEN_LIMITS__MAX_SESSIONS": " 12 ",
                                 "SANDKASTEN_ALLOWED_IMAGES": "base, python", "SANDKASTEN_API_KEY": "123",
                                 "SANDKASTEN_CLUSTER__HEARTBEAT_SECONDS": "1.5"})
    assert (cfg.defaults.readonly_rootfs, cfg.limits.max_sessions, cfg.allowed_images, cfg.api_key,
            cfg.cluster.heartbeat_seconds) == (True, 12, ("base", "python"), "123", 1.5)
    cfg = config.from_mapping({"api_key": 123, "network": None, "pool": {"images": None}, "db_path": None,
                               "data_dir": "/srv/sk/../sk"})
    assert (cfg.api_key, cfg.network, cfg.pool.images, cfg.db_path) == ("123", config.Network(), {}, None)
    assert cfg.data_dir == Path("/srv/sk/../sk") and cfg.data_dir.is_absolute()


def test_the_defaults_are_what_they_were():
    cfg = config.from_mapping({})
    assert cfg == config.Config() == config.load(None, env={})
    assert (cfg.listen, cfg.api_key, cfg.data_dir, cfg.db_path, cfg.session_ttl_seconds, cfg.idle_timeout_seconds) == (
        "127.0.0.1:8080", "", Path("/var/lib/sandkasten"), None, 1800, 0)
    assert msgspec.structs.asdict(cfg.defaults) == {
        "cpu_limit": 1.0, "mem_limit_mb": 512, "pids_limit": 256, "max_exec_timeout_ms": 600_000,
        "exec_timeout_ms": 120_000, "network_mode": "none", "readonly_rootfs": False, "max_output_bytes": 1_048_576,
        "disk_limit_mb": 2048}
    assert (cfg.limits.max_mem_limit_mb, cfg.limits.max_total_mem_mb, cfg.security.seccomp, cfg.security.run_as_uid,
            cfg.network.session_egress_within, cfg.journal.durability, cfg.reconcile.lost_sandbox_policy,
            cfg.cluster.host_timeout_seconds, cfg.processes.max_log_bytes, cfg.console) == (
        8192, 0, "mvp", 65534, ("0.0.0.0/0",), "normal", "fail", 15.0, 64 * 1024 * 1024, config.Console())
    with pytest.raises(AttributeError):
        cfg.defaults.mem_limit_mb = 1   # frozen, as before
