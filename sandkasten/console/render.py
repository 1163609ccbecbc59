"""Pages from Jinja templates, every value escaped (autoescape), and the headers every console
answer carries: a strict Content-Security-Policy (scripts and styles only from /console/static
and /console/assets, no inline script at all), no framing, no sniffing, no caching of data.

The one allowance: styles with this response's nonce. xterm.js builds `<style>` elements at run
time; the terminal page's script gives them the nonce (see static/terminal.js)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import jinja2
from sanic import Request
from sanic.response import HTTPResponse, html

from sandkasten import __version__

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("sandkasten.console", "templates"),
    autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
NAV = (("sessions", "/console/sessions", "Sessions"), ("workspaces", "/console/workspaces", "Workspaces"),
       ("audit", "/console/audit", "Audit"), ("metrics", "/console/metrics", "Metrics"))


def policy(nonce: str | None) -> str:
    styles = f"'self' 'nonce-{nonce}'" if nonce else "'self'"
    return ("default-src 'none'; script-src 'self'; "
            f"style-src {styles}; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def secure_headers(request: Request, response: HTTPResponse) -> None:
    """Set on every answer under /console (a blueprint response hook)."""
    response.headers["content-security-policy"] = policy(getattr(request.ctx, "csp_nonce", None))
    response.headers["x-content-type-options"] = "nosniff"
    response.headers["x-frame-options"] = "DENY"
    response.headers["referrer-policy"] = "same-origin"   # no-referrer would make form posts say Origin: null
    response.headers.setdefault("cache-control", "no-store")


def page(request: Request, template: str, *, status: int = 200, section: str = "", **context) -> HTTPResponse:
    nonce = secrets.token_urlsafe(18)
    request.ctx.csp_nonce = nonce
    login = getattr(request.ctx, "login", None)
    body = ENV.get_template(template).render(
        csrf=login.csrf if login else "", nonce=nonce, nav=NAV, section=section, version=__version__,
        logged_in=login is not None, **context)
    return html(body, status=status)


def fragment(template: str, **context) -> str:
    return ENV.get_template(template).render(**context)


# --- filters: how values read on a page ---------------------------------------------------

def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def short_time(value: str | None) -> str:
    moment = parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "—"


def epoch_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: float | int | None) -> str:
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 1 else f"{ms:.2f} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 120:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def size(n: int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


ENV.filters.update(short_time=short_time, epoch_time=epoch_time, duration=duration, size=size)
