"""Config checks: a cgroup_parent that is not one plain directory name, and keys that were removed."""

from __future__ import annotations

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
