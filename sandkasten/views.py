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


def process_view(row: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `processes` read-table row as clients see it; `live` (the runner's record of a
    running process) fills in its byte counts and output hash so far."""
    out = {
        "process_id": row["id"], "session_id": row["session_id"], "cmd": row["cmd"], "cwd": row["cwd"],
        "pty": {"rows": row["pty_rows"], "cols": row["pty_cols"]} if row["pty_rows"] else None,
        "status": row["status"], "pid": row["pid"], "exit_code": row["exit_code"], "signal": row["signal"],
        "timed_out": bool(row["timed_out"]), "timeout_ms": row["timeout_ms"],
        "requested_at": row["requested_at"], "started_at": row["started_at"], "exited_at": row["exited_at"],
        "duration_ms": row["duration_ms"], "stdout_bytes": row["stdout_bytes"] or 0,
        "stderr_bytes": row["stderr_bytes"] or 0, "output_sha256": row["output_sha256"],
        "dropped_bytes": row["dropped_bytes"] or 0, "input_bytes": row["input_bytes"],
        "input_count": row["input_count"], "lost_reason": row["lost_reason"], "actor": row["actor"],
    }
    if live is not None and live.get("state") == "running":
        out.update(stdout_bytes=live.get("stdout_bytes", 0), stderr_bytes=live.get("stderr_bytes", 0),
                   output_sha256=live.get("output_sha256"), dropped_bytes=live.get("dropped_bytes", 0))
    out["output_bytes"] = out["stdout_bytes"] + out["stderr_bytes"]
    return out
