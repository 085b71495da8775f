"""The service on several hosts of one machine: network namespaces joined by a bridge, a
data host (PostgreSQL, Redis with Sentinel), two app hosts and an HAProxy edge, and the
drills that break them (`bin/cluster up|down|drill`). A development and test tool, not part
of the service."""
