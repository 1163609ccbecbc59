"""Follow the shared journal without polling: LISTEN/NOTIFY on PostgreSQL.

Who runs this: the daemon of a cluster host, instead of the executor's polling `follow`.
Every committed append NOTIFYs (store/postgres.py); on a wake-up (or every FALLBACK_S, in
case a notification was lost with a dropped connection) this host starts the work the
journal asks of it: the executor's own catch-up (sessions placed here), sessions nobody has
placed yet (created by a CLI on the journal), and sessions re-placed here after their host was
lost (policy `recreate`). Waiters for a remote create are woken too (`Membership.tick`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from sandkasten.cluster.membership import Membership
from sandkasten.errors import SandkastenError
from sandkasten.schema.vocabulary import SessionStatus
from sandkasten.store import postgres

log = logging.getLogger("sandkasten.cluster")
FALLBACK_S = 5.0
RETRY_S = 1.0
API_PLACES_WITHIN_S = 10.0


def _orphaned(row: dict, now: datetime) -> bool:
    """An unplaced session the followers place: one the CLI requested straight into the
    journal, or one whose API node did not place it in time (it died). An API node places its
    own creates (and answers the client with the outcome), the followers leave those alone."""
    if not str(row["actor"]).startswith("api:"):
        return True
    return (now - datetime.fromisoformat(row["created_at"])).total_seconds() > API_PLACES_WITHIN_S


class Follower:
    def __init__(self, membership: Membership):
        self.membership = membership
        self.executor = membership.executor
        self.journal = membership.journal
        self.seen = -1

    async def run(self) -> None:
        while True:
            try:
                async with postgres.notifications(self.journal.url) as wait:
                    while True:
                        await self.pass_once()
                        await wait(FALLBACK_S, self.wanted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a dropped connection: listen again
                log.warning("follow: %s", getattr(e, "message", None) or e)
                await asyncio.sleep(RETRY_S)

    def wanted(self, payload: str) -> bool:
        """Every append wakes the waiters of a remote create; the executor's catch-up runs only
        for what another process appended on a session placed here or on one nobody placed
        (what this host appended itself it acted on already; other hosts' sessions are theirs)."""
        self.membership.tick.bump()
        appender, _, owner = payload.partition("|")
        me = self.membership.host_id
        return appender != me and owner in (me, "")

    async def pass_once(self) -> None:
        try:
            seq = await self.journal.last_seq()
            if seq == self.seen:
                return
            self.seen = seq
            self.membership.tick.bump()
            await self.executor.catch_up()
            recreate = self.membership.cfg.reconcile.lost_sandbox_policy == "recreate"
            now = datetime.now(UTC)
            for row in await self.journal.sessions():
                if row["status"] == SessionStatus.REQUESTED and row["host_id"] is None and _orphaned(row, now):
                    try:
                        placed = await self.membership.place(row["id"])  # one node wins
                    except SandkastenError as e:
                        log.warning("unable to place %s: %s", row["id"], e.message)
                        continue
                    if placed is not None and self.membership.owns(placed):
                        self.executor.ensure_session(row["id"])
                elif recreate and row["status"] == SessionStatus.LOST and self.membership.owns(row) \
                        and row["host_epoch"] == self.membership.epoch:
                    self.executor.ensure_session(row["id"])   # re-placed here after its host was lost
        except SandkastenError as e:
            log.warning("follow: %s", e.message)
