"""Session features as a reviewer tries them: config bounds that keep the pool, limits and
TTLs consistent, and what a client hears about a session that expired."""

from __future__ import annotations

import pytest

from sandkasten import config as config_mod
from sandkasten.errors import ConfigError


@pytest.mark.parametrize("mapping, message", [
    # a default TTL above the maximum: creates without ttl_seconds got more than any client may ask for
    ({"session_ttl_seconds": 100_000}, "session_ttl_seconds: above limits.max_ttl_seconds"),
    ({"limits": {"max_ttl_seconds": 600}}, r"session_ttl_seconds: above limits.max_ttl_seconds \(1800 > 600\)"),
    # pool members of an image no client may ask for could never be handed out
    ({"allowed_images": ["base"], "pool": {"enabled": True, "images": {"base": 1, "python": 2}}},
     "pool.images: 'python' not in allowed_images"),
])
def test_config_refuses_what_no_session_could_use(mapping, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.from_mapping(mapping)


def test_config_accepts_what_fits():
    config_mod.from_mapping({"session_ttl_seconds": 600, "limits": {"max_ttl_seconds": 600}})
    config_mod.from_mapping({"allowed_images": ["base"], "pool": {"enabled": False, "images": {"python": 2}}})
    config_mod.from_mapping({"allowed_images": ["base"], "pool": {"enabled": True, "images": {"base": 2, "python": 0}}})
