"""What an inference call resolves to, and the reply it produces.

`resolve` is the one indexed read an inference makes; everything after it
works on the plain `Target`, with no database connection held.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from models import Llm, PublisherSession
from services.errors import NotFound


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: str
    status: str
    model: str
    url: str
    api_key: str | None  # as stored: encrypted (services/api_keys.py); Upstream decrypts it
    session_id: str | None
    owner: str | None  # the token owning the publisher session (virtual rows)

    def __repr__(self):  # never the key
        return f"Target({self.name!r}, {self.kind}/{self.status})"


@dataclass(slots=True)
class Reply:
    """A status and either a body (bytes, or JSON-able) or an SSE byte stream."""

    status: int
    body: object = None
    stream: Iterator[bytes] | None = None
    content_type: str = "application/json"


# Built once with a bound parameter, so it is compiled and cache-keyed once,
# and run on the session's connection, skipping the ORM layer: this is the
# per-inference read.
_TARGET_QUERY = (
    sa.select(Llm.name, Llm.kind, Llm.status, Llm.model, Llm.url, Llm.api_key,
              Llm.provider_session_id, PublisherSession.owner)
    .outerjoin(PublisherSession, PublisherSession.id == Llm.provider_session_id)
    .where(Llm.name == sa.bindparam("name")))


def resolve(session, name: str) -> Target:
    """The LLM called `name`, as a Target. Raises NotFound."""
    row = session.connection().execute(_TARGET_QUERY, {"name": name}).first()
    if row is None:
        raise NotFound(f"LLM '{name}' not found", code="llm_not_found")
    return Target(*row)


def sse_event(payload: bytes) -> bytes:
    """One `data:` event; a payload with newlines spans several data lines."""
    if b"\n" in payload:
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keepalive\n\n"
