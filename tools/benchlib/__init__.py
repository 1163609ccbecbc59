"""Pieces of `tools/bench`: samples and the report, a daemon on a loopback port, the
baselines (spawn, bwrap, unshare, a bash pipe, SQLite) and one module per measured area."""
