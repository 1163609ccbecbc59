"""The CLI in a cluster: an exec's output lives on the host that ran it (its runner's log),
not in the journal, so `sandkasten logs` and `sandkasten exec` on one host fetch the output
of another host's session from that host's API (GET …/execs/{id}?raw_output=true).

Who runs this: the CLI process, on any host that shares the journal (it needs the cluster's
api_key, which every host has in its config).
"""

from __future__ import annotations

import base64
from typing import Any

from sandkasten.config import Config
from sandkasten.errors import SandkastenError


class OutputUnavailable(SandkastenError):
    code = "HOST_UNREACHABLE"


async def owner_address(journal: Any, cfg: Config, sid: str) -> str | None:
    """Base URL of the host that runs `sid` when that is another host; None: read it here."""
    if not cfg.shared_journal:
        return None
    row = await journal.session(sid)
    if row is None or row.get("host_id") in (None, cfg.host_id):
        return None
    found = [h["address"] for h in await journal.hosts() if h["id"] == row["host_id"]]
    return found[0] if found else None


def exec_output(cfg: Config, address: str, sid: str, exec_id: str) -> tuple[bytes, bytes, bytes, bool]:
    """(stdout, stderr, both, truncated) of an exec, from the host at `address`."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        r = httpx.get(f"{address}/v1/sessions/{sid}/execs/{exec_id}", params={"raw_output": "true"},
                      headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise OutputUnavailable(f"unable to read the output of exec {exec_id} from host {address}: {e}") from None
    if r.status_code != 200:
        raise OutputUnavailable(f"unable to read the output of exec {exec_id} from host {address}: "
                                f"HTTP {r.status_code} {r.text[:200]}")
    body = r.json()
    if "output_base64" not in body:
        return b"", b"", b"", False
    return (base64.b64decode(body["stdout_base64"]), base64.b64decode(body["stderr_base64"]),
            base64.b64decode(body["output_base64"]), bool(body.get("truncated")))
