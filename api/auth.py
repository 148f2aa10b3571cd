"""Tokens (stored as SHA-256, never in clear) and the one auth dependency every route uses.

`current_owner` asks each source in `app.state.auth_sources` for a raw token; `create_app`
installs the bearer header; the dashboard appends its cookie session source, which verifies its
signed session itself and answers with the `Token` row instead of a raw token."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from worker.models import Token

from .errors import InvalidToken, Unauthorized
from .sessions import request_session

log = logging.getLogger("quanttune.auth")
TOKEN_PREFIX = "qt_"
AuthSource = Callable[[Request], "str | Token | None"]  # a raw token, or an owner the source verified


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, name: str) -> str:
    """Store a new token's hash and return the token itself (shown once)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(Token(name=name, token_hash=hash_token(raw)))
    session.commit()
    return raw


REVOKED = "revoked:"  # a revoked token's stored hash: no token hashes to it (not hex), so none matches


def revoke_token(session: Session, token_id: int) -> str | None:
    """Make a token unusable, keeping its jobs (and their owner); its name, or None when there is no
    such token. Its dashboard sessions end, as they are signed with the stored hash."""
    token = session.get(Token, token_id)
    if token is None:
        return None
    if not token.token_hash.startswith(REVOKED):
        token.token_hash = REVOKED + secrets.token_hex(28)
        session.commit()
    return token.name


def token_rows(session: Session) -> list[dict[str, object]]:
    """Every token as `quanttune token list` shows it: id, name, created_at, state, jobs."""
    from sqlalchemy import func

    from worker.models import JobRecord

    jobs = dict(session.execute(select(JobRecord.owner_id, func.count()).group_by(JobRecord.owner_id)).all())
    return [{"id": t.id, "name": t.name, "created_at": t.created_at.isoformat(timespec="seconds"),
             "state": "revoked" if t.token_hash.startswith(REVOKED) else "active", "jobs": jobs.get(t.id, 0)}
            for t in session.scalars(select(Token).order_by(Token.id))]


def bearer_source(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


_BY_HASH = select(Token).where(Token.token_hash == bindparam("token_hash"))  # built once: every request runs it


def owner_for(session: Session, raw: str) -> Token | None:
    return session.scalar(_BY_HASH, {"token_hash": hash_token(raw)})


# Declares the bearer scheme in the OpenAPI document (Swagger's "Authorize", fuzzers' auth checks); the
# header itself is read by `bearer_source`, so that every source goes through one path.
DOCUMENTED_BEARER = HTTPBearer(auto_error=False, scheme_name="token",
                                description="An API token from `quanttune token create`.")


def current_owner(request: Request, session: Annotated[Session, Depends(request_session)],
                  _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(DOCUMENTED_BEARER)] = None) -> Token:
    """The token-holder of this request, from the first auth source that yields a token. The
    connection the check used goes back to the pool here, in the same thread: left to the route, its
    release would queue for a request thread behind other requests' auth checks, each holding a
    connection, and a burst of submissions exhausted the pool (8 of 50 concurrent submits got 503)."""
    try:
        return authenticate(request, session)
    finally:
        session.close()  # the route's next query checks a connection out again


def authenticate(request: Request, session: Session) -> Token:
    """`current_owner` as a plain function, for dependencies that do their own database work in the
    same thread-pool call (`api.deps.owned_job`)."""
    raw = None
    for source in request.app.state.auth_sources:
        raw = source(request)
        if raw:
            break
    if isinstance(raw, Token):  # already verified by its source (the dashboard's signed cookie session)
        return raw
    if not raw:
        log.info("auth failed: no token on %s %s from %s", request.method, request.url.path, _client(request))
        raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'.")
    token = owner_for(session, raw)
    if token is None:
        log.warning("auth failed: unknown token on %s %s from %s", request.method, request.url.path, _client(request))
        raise InvalidToken("invalid token.")
    return token


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


Owner = Annotated[Token, Depends(current_owner)]
