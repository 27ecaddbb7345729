"""API tokens: create, list, revoke, authenticate. Only hashes are stored."""
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from models import ApiToken, Role
from services import rows
from services.errors import Conflict, NotFound, Unauthorized

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sb_"
# last_used_at is informative; writing it on every request would make every
# read a write, so it is refreshed at most this often.
LAST_USED_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class Caller:
    """Who is calling: what views and services need to know of a token."""

    id: str
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(session, name: str, role: str) -> str:
    """Store a new token and return it; the plaintext exists only in the return value.

    Raises Conflict when the name is taken, also by a concurrent create
    whose row the unique index saw first.
    """
    taken = f"Token name '{name}' is taken"
    if session.scalar(sa.select(ApiToken.id).where(ApiToken.name == name)):
        raise Conflict(taken, code="name_taken")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=Role(role), token_hash=hash_token(raw)))
    rows.flush_or_conflict(session, taken)
    log.info("created %s token %s", role, name)
    return raw


def list_tokens(session) -> list[ApiToken]:
    return list(session.scalars(sa.select(ApiToken).order_by(ApiToken.created_at)))


def revoke_token(session, name: str, now) -> ApiToken:
    """Mark the named token revoked. Raises NotFound."""
    token = session.scalar(sa.select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise NotFound(f"No token named '{name}'")
    if token.revoked_at is None:
        token.revoked_at = now
    log.info("revoked token %s", name)
    return token


def has_active_admin(session) -> bool:
    return session.scalar(sa.select(sa.func.count()).select_from(ApiToken).where(
        ApiToken.role == Role.ADMIN, ApiToken.revoked_at.is_(None))) > 0


def bootstrap_admin(session) -> str | None:
    """A new admin token when no active one exists (named `admin`, or
    `admin-2`, ... when a revoked token holds the name), else None."""
    if has_active_admin(session):
        return None
    taken = set(session.scalars(sa.select(ApiToken.name).where(ApiToken.name.like("admin%"))))
    name = next(n for n in ("admin", *(f"admin-{i}" for i in range(2, len(taken) + 3)))
                if n not in taken)
    return create_token(session, name, Role.ADMIN)


# Every request runs this: built once (so its compiled form is cached once)
# and run on the session's connection, skipping the ORM layer.
_TOKEN_BY_HASH = (
    sa.select(ApiToken.id, ApiToken.name, ApiToken.role, ApiToken.revoked_at,
              ApiToken.last_used_at)
    .where(ApiToken.token_hash == sa.bindparam("token_hash")))


def authenticate(session, header: str | None, now, recent=None) -> tuple[Caller, bool]:
    """Resolve an `Authorization: Bearer <token>` header.

    Returns the caller and whether `last_used_at` was written (the caller
    then commits). Raises Unauthorized. With `recent` (a TtlMap of token
    hash -> Caller, the worker's), a token found valid lately is not read
    again: a revocation reaches this worker within the map's ttl.
    """
    if not header:
        raise Unauthorized("Missing bearer token", code="missing_token")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'", code="missing_token")
    token_hash = hash_token(raw.strip())
    if recent is not None and (known := recent.get(token_hash)) is not None:
        return known, False
    row = session.connection().execute(_TOKEN_BY_HASH, {"token_hash": token_hash}).first()
    if row is None:
        raise Unauthorized("Unknown token", code="invalid_token")
    if row.revoked_at is not None:
        raise Unauthorized("Token revoked", code="revoked_token")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_GRANULARITY:
        session.execute(sa.update(ApiToken).where(ApiToken.id == row.id)
                        .values(last_used_at=now))
        touched = True
    else:
        touched = False
    caller = Caller(id=row.id, name=row.name, role=row.role)
    if recent is not None:
        recent.put(token_hash, caller)
    return caller, touched
