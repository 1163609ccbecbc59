"""Query-string arguments, read the same way by every route: flags, required values, counts."""

from __future__ import annotations

from sanic import Request

from sandkasten.config import yes_no
from sandkasten.errors import InvalidRequest


def flag(request: Request, name: str) -> bool:
    """A query flag: true/1/yes or false/0/no (any case); absent is false, anything else a 400."""
    value = request.args.get(name)
    if value is None:
        return False
    answer = yes_no(value)
    if answer is None:
        raise InvalidRequest(f"invalid query parameter {name}={value!r}: use true or false", parameter=name)
    return answer


def required(request: Request, name: str, verb: str) -> str:
    value = request.args.get(name)
    if not value:
        raise InvalidRequest(f"invalid {verb}: query parameter {name!r} is required")
    return value


def count(request: Request, name: str) -> int | None:
    """A non-negative integer argument, None when absent."""
    value = request.args.get(name)
    if value is None:
        return None
    if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
        raise InvalidRequest(f"invalid {name} {value}: must not be negative")
    if not (value.isascii() and value.isdigit()):   # int() would also take ' 1', '+1', '1_0', '١'
        raise InvalidRequest(f"invalid {name} {value!r}: expected an integer of digits 0-9")
    return int(value)
