"""Every string that comes from a client or an archive is checked the same way (label sets, dataset labels, archive
class folders, embedding inputs): not empty, at most ``limit`` characters, valid UTF-8 (no lone surrogates), no
control characters, no bidirectional overrides (text that displays other than it reads). Numbers follow JSON:
``Integer`` is an int field of a strict request model that also takes 3.0 (JSON has one number type, and JSON
Schema calls 3.0 an integer) but never "3", true or 3.5."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import BeforeValidator

from service.errors import InvalidRequest

__all__ = ["BIDI_CONTROLS", "INTEGRAL", "Integer", "clean_text", "text_from_bytes"]

BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


INTEGRAL = BeforeValidator(_integral)
"""Marks an int of a strict model that also takes 3.0; the strict check still refuses "3", true and 3.5. In an
optional field it goes after the bounds, ``Annotated[int, Field(ge=1), INTEGRAL] | None``: pydantic publishes bounds
put on the union itself as "ge"/"le", which are not JSON Schema."""
Integer = Annotated[int, INTEGRAL]
"""A required or defaulted int field with ``INTEGRAL`` (bounds in its ``Field``)."""


def _shown(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else "")).encode("unicode_escape", "backslashreplace").decode()


def clean_text(text: str, what: str, limit: int) -> str:
    """``text`` unchanged when acceptable; 422 naming ``what`` and the problem otherwise."""
    if not text.strip():
        raise InvalidRequest(f"{what} is empty")
    if len(text) > limit:
        raise InvalidRequest(f"{what} has {len(text)} characters; the limit is {limit}")
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cs":
            raise InvalidRequest(f"{what} is not valid UTF-8 (it holds a lone surrogate)")
        if category == "Cc":
            raise InvalidRequest(f"{what} {_shown(text)} contains control characters (U+{ord(ch):04X})")
        if ch in BIDI_CONTROLS:
            raise InvalidRequest(f"{what} {_shown(text)} contains a bidirectional control character "
                                 f"(U+{ord(ch):04X})")
    return text


def text_from_bytes(raw: bytes, what: str, limit: int) -> str:
    """Bytes that must be UTF-8 text (an archive's folder names), checked like :func:`clean_text`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid UTF-8 ({raw[:40]!r})") from exc
    return clean_text(text, what, limit)
