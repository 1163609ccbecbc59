"""Who may see the console: a login with the API key (or `console.key`) into a signed cookie,
and a CSRF token bound to that login for every state change.

Who runs this: the daemon's event loop, from the API's request hook (sandkasten.api.app), before
any route. Nothing is stored server-side: the cookie is `<expiry>.<nonce>.<mac>`, the mac an
HMAC-SHA256 under a secret derived from the login key, so a login survives a daemon restart and
ends when the key changes. Logging out forgets the nonce in this process (and the browser drops
the cookie). The CSRF token is a second HMAC of the nonce: a page carries it in a meta tag and
its scripts send it as `X-CSRF-Token`; plain forms send it as the field `csrf`.

The cookie is `HttpOnly`, `SameSite=Strict`, `Path=/` (the console's scripts call the JSON API
with it) and `Secure` when the request came over TLS. The JSON API still wants its bearer header;
it takes the cookie instead only together with a valid CSRF header on anything but a read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote

from sanic import Request
from sanic.response import HTTPResponse, redirect

from sandkasten.api import errors

COOKIE = "sk_console"
LIFETIME_S = 12 * 3600
PREFIX = "/console"
LOGIN = "/console/login"
PUBLIC = frozenset({LOGIN, "/console/static/console.css"})   # what a login page needs; no data
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Login:
    nonce: str
    expires: int
    csrf: str


class Gate:
    """The console's door: cookies in, redirects out."""

    def __init__(self, api_key: str, console_key: str) -> None:
        key = (console_key or api_key).encode()
        self.open = not key   # no key configured: the API is open too; the login asks for nothing
        self.separate_key = bool(console_key)
        self._key = key
        self._secret = hmac.new(key, b"sandkasten console cookie v1", hashlib.sha256).digest()
        self.actor = "console:" + (hashlib.sha256(key).hexdigest()[:8] if key else "anonymous")
        self._revoked: set[str] = set()

    # --- tokens ----------------------------------------------------------------------------

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def key_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._key)

    def issue(self, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + LIFETIME_S
        body = f"{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac(body)}"

    def read(self, token: str | None, now: float | None = None) -> Login | None:
        """The login a cookie value proves, or None (absent, forged, expired, logged out)."""
        if not token or token.count(".") != 2:
            return None
        expires, nonce, mac = token.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(f"{expires}.{nonce}").encode()):
            return None
        if not expires.isdigit() or int(expires) < (now if now is not None else time.time()):
            return None
        if nonce in self._revoked:
            return None
        return Login(nonce=nonce, expires=int(expires), csrf=self._mac("csrf." + nonce)[:40])

    def revoke(self, login: Login) -> None:
        self._revoked.add(login.nonce)

    def cookie_header(self, token: str, secure: bool) -> str:
        parts = [f"{COOKIE}={token}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={LIFETIME_S}"]
        return "; ".join(parts + (["Secure"] if secure else []))

    @staticmethod
    def clear_header(secure: bool) -> str:
        return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0" + ("; Secure" if secure else "")

    # --- the request hook ------------------------------------------------------------------

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def wants_form(self, request: Request) -> bool:
        """Whether a state change on a console path needs its body read before `check_page`:
        the login form (its key), or a logged-in user's form (its CSRF token). A body from
        anybody else is never read."""
        return request.path in PUBLIC or self.read(request.cookies.get(COOKIE)) is not None

    def check_page(self, request: Request) -> HTTPResponse | None:
        """For a /console path: None to go on (request.ctx.login set unless public), a redirect
        to the login page without a valid cookie, 403 for a state change without its CSRF token."""
        request.ctx.login = None
        if request.path in PUBLIC:
            return None
        login = self.read(request.cookies.get(COOKIE))
        if login is None:
            return redirect(f"{LOGIN}?next={quote(request.path, safe='/')}", status=303,
                            headers={"cache-control": "no-store"})
        request.ctx.login = login
        request.ctx.actor = self.actor
        if request.method not in SAFE_METHODS:
            return self.refuse_forgery(request, login, allow_form=True)
        return None

    def check_api(self, request: Request) -> tuple[bool, HTTPResponse | None]:
        """For a JSON API request without a valid bearer header: (True, None) when the console's
        cookie stands in for it, (True, 403) when it does but a state change lacks the CSRF
        header, (False, None) when there is no valid cookie."""
        login = self.read(request.cookies.get(COOKIE))
        if login is None:
            return False, None
        request.ctx.login = login
        request.ctx.actor = self.actor
        if request.method not in SAFE_METHODS:
            return True, self.refuse_forgery(request, login, allow_form=False)
        return True, None

    def refuse_forgery(self, request: Request, login: Login, allow_form: bool) -> HTTPResponse | None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return errors.body("FORBIDDEN", f"refused a state change from another origin ({origin!r})",
                               {"origin": origin})
        given = request.headers.get("x-csrf-token")
        if given is None and allow_form and request.content_type.startswith("application/x-www-form-urlencoded"):
            form = request.form   # typed Optional by sanic; an unparsable body gives an empty one
            given = form.get("csrf") if form is not None else None
        if not given or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), login.csrf.encode()):
            return errors.body("FORBIDDEN", "missing or wrong CSRF token: the console sends it as the "
                               "X-CSRF-Token header (reload the page to get a fresh one)")
        return None


def safe_next(target: str | None) -> str:
    """Where a login may send the browser: only a console path, never another site."""
    if (not target or not Gate.owns(target.split("?", 1)[0]) or "//" in target or "\\" in target
            or not target.isascii() or not target.isprintable() or target.startswith(LOGIN)):
        return PREFIX
    return target
