"""Idempotency-Keys: the rules a key follows.

A retried `POST /api/reservations` with the same key within `WINDOW_MS` returns the hold the
first request made, and never holds twice; the same key with a different body is refused.
"""

from __future__ import annotations

from server.domain.inventory import IDEMPOTENCY_WINDOW_MS

# A key is 1 to 255 printable ASCII characters (HTTP would strip spaces at either end).
MAX_KEY_LENGTH = 255
KEY_PATTERN = "^[!-~]([ -~]*[!-~])?$"
WINDOW_MS = IDEMPOTENCY_WINDOW_MS


def is_valid_key(key: str) -> bool:
    """1 to `MAX_KEY_LENGTH` printable ASCII characters."""
    return 1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()
