"""What JSON text we refuse although pydantic's parser takes it: an object that names a key
twice (`{"quantity": 1, "quantity": 500}`). The parser keeps the last value silently, so a
proxy, a log or a receiver that reads the first one sees another request than the one we
act on (attack finding A11). RFC 8259 only says the names SHOULD be unique; we require it."""

from __future__ import annotations

import json
from typing import Any


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Repeated(key)
        seen.add(key)
    # Only the keys are checked: the values are never used, so none is built.


def repeated_key(text: str | bytes) -> str | None:
    """The first key that some object in `text` names twice, at any depth; None when there
    is none, and also when `text` is not JSON at all (the caller's parser says why)."""
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _Repeated as found:
        return found.key
    except (ValueError, RecursionError):
        return None
    return None
