"""The public shape of a session, one function shared by the HTTP API and the CLI's
`--json`, so both always say the same thing."""

from __future__ import annotations

from typing import Any


def session_view(row: dict[str, Any]) -> dict[str, Any]:
    """A `sessions` read-table row as clients see it."""
    return {
        "id": row["id"], "image": row["image"], "status": row["status"], "cwd": row["cwd"],
        "workspace_id": row["workspace_id"], "created_at": row["created_at"],
        "expires_at": row["expires_at"], "ended_at": row["ended_at"], "pooled": bool(row["pooled"]),
        "cpu_limit": row["cpu_limit"], "mem_limit_mb": row["mem_limit_mb"], "pids_limit": row["pids_limit"],
        "network_mode": row["network_mode"], "exec_count": row["exec_count"],
        "lost_reason": row["lost_reason"], "end_reason": row["end_reason"], "actor": row["actor"],
        "pool": row["pool"],
        "host_id": row.get("host_id"),  # a cluster: the host its sandbox runs on (None on one host)
    }
