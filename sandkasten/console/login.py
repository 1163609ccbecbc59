"""Logging in and out of the console (the cookie itself: sandkasten.console.auth)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from sanic import Request
from sanic.response import redirect

from sandkasten.api import blueprint
from sandkasten.console import auth
from sandkasten.console.render import page

bp = blueprint("console_login", url_prefix="/console")
log = logging.getLogger("sandkasten.console")
FAILED_LOGIN_DELAY_S = 0.5   # slows guessing; the key comparison itself is constant-time


def gate(request: Request) -> auth.Gate:
    return request.app.ctx.console_gate


@bp.get("/")
async def home(request: Request):
    return redirect("/console/sessions", status=303)


@bp.get("/login")
async def login_form(request: Request):
    g = gate(request)
    already = g.read(request.cookies.get(auth.COOKIE))
    target = auth.safe_next(request.args.get("next"))
    if already is not None:
        return redirect(target, status=303)
    return page(request, "login.html", next=target, error=None, open=g.open, separate_key=g.separate_key)


@bp.post("/login")
async def login(request: Request):
    g = gate(request)
    form: Mapping[str, Any] = {}
    if request.content_type.startswith("application/x-www-form-urlencoded"):
        form = request.form or {}   # typed Optional by sanic; an unparsable body gives an empty one
    given = form.get("key") or ""
    target = auth.safe_next(form.get("next"))
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return page(request, "login.html", status=403, next=target, open=g.open, separate_key=g.separate_key,
                    error=f"refused a login posted from another origin ({origin})")
    if not g.key_matches(given):
        log.warning("console: failed login from %s", request.ip)
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        which = "console key" if g.separate_key else "API key"
        return page(request, "login.html", status=401, next=target, open=g.open, separate_key=g.separate_key,
                    error=f"wrong {which}: log in with the daemon's {which} (sandkasten.yaml)")
    log.info("console: login from %s", request.ip)
    secure = request.scheme == "https"
    return redirect(target, status=303, headers={"set-cookie": g.cookie_header(g.issue(), secure)})


@bp.post("/logout")
async def logout(request: Request):
    login_now = request.ctx.login   # the gate checked the cookie and the CSRF token
    gate(request).revoke(login_now)
    return redirect(auth.LOGIN, status=303,
                    headers={"set-cookie": auth.Gate.clear_header(request.scheme == "https")})
