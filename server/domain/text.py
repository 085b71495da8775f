"""What text we keep: the one rule for every string a client sends that reaches the database
or a log (names, descriptions, URLs, Idempotency-Keys, query parameters, WebSocket messages).

Both databases must be able to store it, as it was sent:

- no U+0000: PostgreSQL's `text` cannot hold it anywhere (asyncpg raises
  `CharacterNotInRepertoireError`, once answered 500 with the connection reset), and SQLite
  cuts a value at it in places (a name that began with it was stored as empty, and the
  `length(name) >= 1` CHECK made it a 500);
- no lone surrogate (U+D800 to U+DFFF on its own): not UTF-8, so neither database can take
  it; JSON bodies refuse `"\\ud800"` already (400 `invalid_json`), this catches what comes
  another way;
- at most a stated number of characters, so that a client cannot make us keep, index or
  log megabytes.

`problem` says which rule a value breaks (or None); the request schemas
(`server.wire.schemas.text`), the headers (`server.api.http.header_text`) and the live
messages all ask it, and answer 400 naming the field.
"""

from __future__ import annotations

NUL = "\x00"
REPLACEMENT = "\ufffd"
# The most characters of a client's value an error message quotes back to it.
SHOWN_CHARS = 64


def problem(value: str, max_chars: int) -> str | None:
    """Why `value` cannot be stored, as the end of a sentence that begins with the field's
    name ("must not contain U+0000"); None when it can. `max_chars`: the most characters
    (code points) the field takes."""
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters (it has {len(value)})"
    if NUL in value:
        return "must not contain U+0000 (the NUL character)"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain a lone surrogate (U+D800 to U+DFFF): it is not UTF-8"
    return None


def is_storable(value: str, max_chars: int) -> bool:
    """`problem(value, max_chars) is None`."""
    return problem(value, max_chars) is None


def storable(value: str, max_chars: int) -> str:
    """`value` made storable, for text we keep but cannot refuse (what a webhook receiver
    answered): each U+0000 and lone surrogate becomes U+FFFD, and it is cut to
    `max_chars`. Text a client sends is refused instead (`problem`), never altered."""
    value = value[:max_chars]
    if is_storable(value, max_chars):
        return value
    return "".join(REPLACEMENT if c == NUL or "\ud800" <= c <= "\udfff" else c for c in value)
