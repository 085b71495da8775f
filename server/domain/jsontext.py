"""Compact JSON text of flat rows and lists, made fast where many are made at once.

`json.dumps` (and `JSONEncoder.encode`) makes a new C encoder on every call, which was most
of the cost of a hold's outbox event in the writer's transaction (5.5 -> 2.4 us an event)
and of a batch's rows sent to PostgreSQL as one JSON text. One encoder is made here once,
from the standard library's own C accelerator (`json.encoder.c_make_encoder`, what
`JSONEncoder.iterencode` uses); where it is missing, the pure-Python encoder gives the same
text.
"""

from __future__ import annotations

import json
from typing import Any

_PORTABLE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
# Arguments as `JSONEncoder.iterencode` passes them: no check for cycles (`markers` None:
# what is encoded here holds no container that contains itself), the default for unknown
# types (TypeError), non-ASCII kept, no indent, ":" and ",", keys unsorted, no key
# skipped, NaN allowed as `json.dumps` allows it.
_FAST: Any = (
    None
    if _MAKE_ENCODER is None
    else _MAKE_ENCODER(
        None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
        False, False, True,
    )
)  # fmt: skip


def compact(value: list[Any] | tuple[Any, ...]) -> str:
    """`value` (a list or tuple of numbers, strings, None, and lists or tuples of them) as
    compact JSON text: no spaces, non-ASCII characters as themselves, the same text as
    `json.dumps(value, separators=(",", ":"), ensure_ascii=False)`. Raises TypeError for a
    value JSON cannot hold."""
    if _FAST is None:
        return _PORTABLE(value)
    return "".join(_FAST(value, 0))
