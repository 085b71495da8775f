"""Every Redis key, channel and queue name the service uses, in one place."""

from __future__ import annotations

# Pub/sub channel carrying live-update frames (docs/design.md §6), one JSON frame per message.
EVENTS_CHANNEL = "flashsale:events"


def events_channel(db: int) -> str:
    """The events channel of a service whose Redis database is `db`. Pub/sub ignores
    databases (a message published from any database reaches every subscriber of its
    channel), so services sharing one Redis in different databases need channels of their
    own; database 0 keeps the plain name."""
    return EVENTS_CHANNEL if db == 0 else f"{EVENTS_CHANNEL}:db{db}"


# arq: the queue the worker consumes, and the job that expires the holds due by a time.
QUEUE_NAME = "flashsale:queue"
EXPIRE_DUE_JOB = "expire_due"
HEALTH_CHECK_KEY = "flashsale:worker:health"


def expire_due_job_id(due_ms: int) -> str:
    """One job per due time: enqueueing it again while it is queued (or just ran) is a no-op."""
    return f"expire:{due_ms}"


# Rate limiting (production readiness): one counter per client and window.
RATE_LIMIT_PREFIX = "flashsale:ratelimit:"
