"""What JSON text we refuse although pydantic's parser takes it: an object that names a key
twice (`{"quantity": 1, "quantity": 500}`). The parser keeps the last value silently, so a
proxy, a log or a receiver that reads the first one sees another request than the one we
act on (attack finding A11). RFC 8259 only says the names SHOULD be unique; we require it."""

from __future__ import annotations

import json
import re
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


# A flat object (no nesting) whose strings hold no backslash and no quote, each value a
# string, a number or a literal: every request body our clients send (a reservation's
# `{"productId": 7, "quantity": 1}`). In such a text each key is exactly the quoted name
# before a colon, as its bytes: nothing is escaped, so no two spellings name one key.
_VALUE = rb'(?:"[^"\\]*"|[-+.0-9eE]+|true|false|null)'
_PAIR = rb'"[^"\\]*"[ \t\r\n]*:[ \t\r\n]*' + _VALUE + rb"[ \t\r\n]*"
_FLAT = re.compile(
    rb"[ \t\r\n]*\{[ \t\r\n]*(?:" + _PAIR + rb",[ \t\r\n]*)*(?:" + _PAIR + rb")?\}[ \t\r\n]*"
)
# Every string of such a text in order, and whether a colon follows it (then it is a key).
# Quotes alternate opening and closing, since no string holds one and none stands outside.
_STRING = re.compile(rb'"([^"\\]*)"([ \t\r\n]*:)?')
# Longer texts take the general path: the fast one is for the small bodies of every request.
_FLAT_MOST = 1024
# Texts already found flat with no key named twice, as sent (oldest first). A sale's
# reservations repeat a few bodies (`{"productId": 7, "quantity": 1}` from every shopper),
# and looking one up costs a hash of its bytes where the two expressions cost ~3 us on every
# request (issue 12: the reservation's cost). Bounded: at most `_KNOWN_MOST` texts of at
# most `_KNOWN_TEXT_MOST` bytes (~64 KB); a client sending new bodies only pushes the
# oldest out, and each is checked in full as before.
_KNOWN: dict[bytes, None] = {}
_KNOWN_MOST = 256
_KNOWN_TEXT_MOST = 256


def _no_repeat_in_flat(text: bytes) -> bool:
    """True when `text` is a flat object (`_FLAT`) that names no key twice; False when it is
    not one, or names one twice (the general path then says which, or that it is no JSON).

    Why not the parser alone: `json.loads` with a hook in Python for every object cost 3x
    pydantic's whole validation of a reservation's body, on every request; this check is
    a tenth of it (bench/README.md, "Reserving cheaper")."""
    if text in _KNOWN:
        return True
    if len(text) > _FLAT_MOST or _FLAT.fullmatch(text) is None:
        return False
    keys = [name for name, colon in _STRING.findall(text) if colon]
    if len(set(keys)) != len(keys):
        return False
    if len(text) <= _KNOWN_TEXT_MOST:
        _KNOWN[text] = None
        if len(_KNOWN) > _KNOWN_MOST:
            del _KNOWN[next(iter(_KNOWN))]
    return True


def repeated_key(text: str | bytes) -> str | None:
    """The first key that some object in `text` names twice, at any depth; None when there
    is none, and also when `text` is not JSON at all (the caller's parser says why)."""
    if isinstance(text, bytes) and _no_repeat_in_flat(text):
        return None
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _Repeated as found:
        return found.key
    except (ValueError, RecursionError):
        return None
    return None
