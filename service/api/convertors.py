"""Path-segment convertors: one segment matched by a regex, so a literal sibling path (``<id>.png``,
``/label-sets/diagnose``) is never taken for an id. Any other segment reaches its route, whose pattern refuses a
malformed id with a 422 that says so."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

__all__ = ["register_segment"]


class _Segment(Convertor[str]):
    def __init__(self, regex: str) -> None:
        self.regex = regex

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def register_segment(name: str, regex: str) -> None:
    """``{param:name}`` matches one path segment that ``regex`` matches."""
    register_url_convertor(name, _Segment(regex))
