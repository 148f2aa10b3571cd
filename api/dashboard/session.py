"""The dashboard's cookie session: signed, stateless, and holding no secret of its own.

The `quanttune_session` cookie is `<token id>.<expiry epoch>.<mac>` where `mac` is an HMAC-SHA256
keyed by the token's stored hash (itself never sent). So the cookie carries neither the token nor
its hash, cannot be forged without the database, expires after `MAX_AGE_S`, and stops working the
moment its token is deleted. Logging out removes the cookie from the browser.

`cookie_source` is the auth source the dashboard adds to `app.state.auth_sources`: the JSON API
accepts the session too (the pages poll it), but for methods other than GET/HEAD only with the
`X-Quanttune-Dashboard` header, which a cross-site form or image cannot send (no CSRF).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from fastapi import Request, Response

from worker.models import Token

from ..auth import owner_for

log = logging.getLogger("quanttune.dashboard")

COOKIE = "quanttune_session"
CSRF_HEADER = "x-quanttune-dashboard"
MAX_AGE_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD"})


def _mac(token_id: int, token_hash: str, expires: int) -> str:
    message = f"quanttune-dashboard-session|{token_id}|{expires}".encode()
    return hmac.new(token_hash.encode(), message, hashlib.sha256).hexdigest()


def session_value(token: Token, now: float | None = None, max_age_s: int = MAX_AGE_S) -> str:
    expires = int(now if now is not None else time.time()) + max_age_s
    return f"{token.id}.{expires}.{_mac(token.id, token.token_hash, expires)}"


def verify(request: Request, value: str | None) -> Token | None:
    """The token a session cookie value stands for, or None (malformed, expired, forged, revoked)."""
    if not value:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or len(parts[0]) > 18:
        log.info("dashboard session refused: malformed cookie on %s", request.url.path)
        return None
    token_id, expires, mac = int(parts[0]), int(parts[1]), parts[2]
    if expires < time.time():
        log.info("dashboard session refused: expired on %s", request.url.path)
        return None
    with request.app.state.sessions() as session:
        token = session.get(Token, token_id)
    if token is None or not hmac.compare_digest(mac, _mac(token.id, token.token_hash, expires)):
        log.warning("dashboard session refused: bad signature or deleted token on %s", request.url.path)
        return None
    return token


def session_owner(request: Request) -> Token | None:
    """The owner of a dashboard page request (cookie session only)."""
    return verify(request, request.cookies.get(COOKIE))


def cookie_source(request: Request) -> Token | None:
    """Auth source for the JSON API: the session cookie, with the CSRF header on unsafe methods."""
    if COOKIE not in request.cookies:
        return None
    if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != "1":
        log.info("dashboard session ignored: %s %s without the %s header", request.method, request.url.path,
                 CSRF_HEADER)
        return None
    return session_owner(request)


def log_in(request: Request, raw_token: str) -> Token | None:
    """The token's owner if `raw_token` is a valid API token."""
    raw_token = raw_token.strip()
    if not raw_token:
        return None
    with request.app.state.sessions() as session:
        owner = owner_for(session, raw_token)
    if owner is None:  # the log names the failure, never the token
        log.warning("dashboard login failed: unknown token from %s", request.client.host if request.client else "?")
    return owner


def set_session(response: Response, request: Request, token: Token) -> None:
    response.set_cookie(COOKIE, session_value(token), max_age=MAX_AGE_S, path="/", httponly=True,
                        samesite="lax", secure=request.url.scheme == "https")


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=request.url.scheme == "https")
