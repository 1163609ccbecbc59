"""Several hosts on one shared journal (PostgreSQL): registry and heartbeat (`membership`),
placement of sessions (`placement`), forwarding of per-session requests to the owning host
(`forward`), and following the journal without polling (`follower`). See docs/cluster.md."""
