"""Query-string arguments, read the same way by every route: flags, required values, counts."""

from __future__ import annotations

from sanic import Request

from sandkasten.errors import InvalidRequest

TRUE = ("1", "true", "yes")


def truthy(value) -> bool:
    """A flag from a query string or a JSON body: true, 1, yes (any case)."""
    return value is True or str(value).lower() in TRUE


def flag(request: Request, name: str) -> bool:
    return truthy(request.args.get(name, "false"))


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
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(f"invalid {name} {value!r}: expected an integer") from None
    if n < 0:
        raise InvalidRequest(f"invalid {name} {n}: must not be negative")
    return n
