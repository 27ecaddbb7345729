"""What an inference call resolves to, and the reply it produces.

`resolve` (one LLM) and `route` (an LLM or a pool, `pool:<model>`) are the
reads an inference makes; everything after them works on plain `Target`s,
with no database connection held.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from jsonio import dumps
from models import DEFAULT_ENDPOINT, ENDPOINTS, Kind, Llm, PublisherSession, Status
from services.errors import Invalid, NotFound, Unavailable, anthropic_envelope, envelope

POOL_PREFIX = "pool:"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one of the endpoints speaks: its path (under /v1 for clients, under
    an LLM's URL for its backend), whether its streams end with `data: [DONE]`
    (OpenAI's chat and completions do; responses and messages do not), and
    whose envelope its errors use (Anthropic's on messages)."""

    path: str
    done_marker: bool = False
    anthropic: bool = False

    def error(self, status: int, message: str, type_: str, code: str, details=None) -> dict:
        if self.anthropic:
            return anthropic_envelope(status, message)
        return envelope(message, type_, code, details)

    def error_event(self, status: int, message: str, type_: str, code: str,
                    details=None) -> bytes:
        """A stream's last event, once its headers are gone."""
        event = sse_event(dumps(self.error(status, message, type_, code, details)))
        return b"event: error\n" + event if self.anthropic else event

    def failure_event(self, exc) -> bytes:
        """`error_event` for a ServiceError."""
        return self.error_event(exc.status, exc.message, exc.type, exc.code)

    @property
    def end(self) -> bytes:
        """What closes a stream that ended well."""
        return SSE_DONE if self.done_marker else b""


ENDPOINT = {path: Endpoint(path, done_marker=path in ("chat/completions", "completions"),
                           anthropic=path == "messages") for path in ENDPOINTS}
CHAT = ENDPOINT[DEFAULT_ENDPOINT]


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
    max_concurrency: int | None = None  # requests in flight at once (None: no cap)
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)  # what its backend serves
    seen_at: str | None = None  # remembered at this routes version: the call checks it (routes.py)

    def __repr__(self):  # never the key
        return f"Target({self.name!r}, {self.kind}/{self.status})"


@dataclass(frozen=True, slots=True)
class Route:
    """Where an inference may run: one LLM (`queue` is its name), or the
    members of a pool (`queue` is `pool:<model>`): the usable rows serving
    `model`, and its hibernating ones, woken only when no other can answer."""

    queue: str
    targets: tuple[Target, ...]
    asleep: tuple[Target, ...] = ()
    pool: str | None = None  # the model, for a pool

    @classmethod
    def single(cls, target: Target) -> "Route":
        return cls(target.name, (target,))

    @property
    def label(self) -> str:
        return f"pool '{self.pool}'" if self.pool is not None else f"LLM '{self.queue}'"

    @property
    def scheduled(self) -> bool:
        """Whether requests go through the fair queue: a pool, or an LLM that
        declares a capacity (the others go straight on)."""
        return self.pool is not None or self.targets[0].max_concurrency is not None

    def target(self, name: str) -> Target:
        return next(t for t in self.targets + self.asleep if t.name == name)


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
_TARGET_COLUMNS = sa.select(
    Llm.name, Llm.kind, Llm.status, Llm.model, Llm.url, Llm.api_key, Llm.provider_session_id,
    PublisherSession.owner, Llm.max_concurrency, Llm.endpoints).outerjoin(
    PublisherSession, PublisherSession.id == Llm.provider_session_id)
_TARGET_QUERY = _TARGET_COLUMNS.where(Llm.name == sa.bindparam("name"))
_POOL_QUERY = _TARGET_COLUMNS.where(Llm.model == sa.bindparam("model"),
                                    Llm.status != Status.INACTIVE).order_by(Llm.name)


def _target(row) -> Target:
    *columns, endpoints = row
    return Target(*columns, endpoints=tuple(endpoints or (DEFAULT_ENDPOINT,)))


def resolve(session, name: str) -> Target:
    """The LLM called `name`, as a Target. Raises NotFound."""
    row = session.connection().execute(_TARGET_QUERY, {"name": name}).first()
    if row is None:
        raise NotFound(f"LLM '{name}' not found", code="llm_not_found")
    return _target(row)


def route(session, name: str, is_live, endpoint: str = DEFAULT_ENDPOINT) -> Route:
    """Where `name` runs: an LLM's name, or `pool:<model>`, for `endpoint`.
    Raises NotFound (no such LLM; no row serves the model), Invalid
    (`endpoint_not_supported`: the LLM, or every member, does not serve
    `endpoint`), Unavailable (`pool_unavailable`: no member can answer now).
    `is_live(session_id)` tells a live publisher."""
    if not name.startswith(POOL_PREFIX):
        return single_route(resolve(session, name), endpoint)
    model = name[len(POOL_PREFIX):]
    targets = [_target(row) for row in session.connection().execute(_POOL_QUERY, {"model": model})]
    serving = [t for t in targets if endpoint in t.endpoints]
    if targets and not serving:
        served = sorted({e for t in targets for e in t.endpoints}, key=ENDPOINTS.index)
        raise not_supported(f"No member of pool '{model}' serves", endpoint, served)
    return pool_route(model, serving, is_live,
                      known=bool(targets) or _model_known(session, model))


def single_route(target: Target, endpoint: str) -> Route:
    """The route to one LLM, for `endpoint`. Raises Invalid (`endpoint_not_supported`)."""
    if endpoint not in target.endpoints:
        raise not_supported(f"LLM '{target.name}' does not serve", endpoint, target.endpoints)
    return Route.single(target)


def not_supported(refusal: str, endpoint: str, served) -> Invalid:
    """400 endpoint_not_supported: `refusal` ("LLM 'x' does not serve") and
    what is served instead."""
    paths = ", ".join("/v1/" + e for e in served)
    return Invalid(f"{refusal} /v1/{endpoint}; it serves {paths}",
                   code="endpoint_not_supported", details={"endpoints": list(served)})


def pool_route(model: str, targets: list[Target], is_live, known: bool = True) -> Route:
    """The pool of `targets` (the rows serving `model` that are not inactive)."""
    awake = tuple(t for t in targets if t.kind == Kind.PUBLIC or (
        t.status == Status.ACTIVE and t.session_id and is_live(t.session_id)))
    asleep = tuple(t for t in targets if t.kind == Kind.VIRTUAL and t.status == Status.HIBERNATING)
    if not awake and not asleep:
        if not known:
            raise NotFound(f"No LLM serves model '{model}'", code="model_not_found")
        raise Unavailable(f"No member of pool '{model}' can answer now", code="pool_unavailable")
    return Route(POOL_PREFIX + model, awake, asleep, pool=model)


def _model_known(session, model: str) -> bool:
    return session.scalar(sa.select(sa.exists().where(Llm.model == model)))


def sse_event(payload: bytes) -> bytes:
    """One `data:` event; a payload with newlines spans several data lines."""
    if b"\n" in payload:
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


# A chunk with an SSE event name travels the bus as one string: the mark, the
# name, a newline, the payload. A payload that starts with the mark itself
# travels with an empty name, so every string reads back one way.
EVENT_MARK = "\x00"


def bus_chunk(data: str, event: str | None = None) -> str:
    """A posted chunk (`data`, optional `event` name) as the bus carries it."""
    if event or data.startswith(EVENT_MARK):
        return f"{EVENT_MARK}{event or ''}\n{data}"
    return data


def sse_chunk(chunk: str) -> bytes:
    """The SSE bytes of a chunk from `bus_chunk`: its `event:` line, if it has
    a name, and its `data:` lines."""
    if not chunk.startswith(EVENT_MARK):
        return sse_event(chunk.encode())
    event, _, data = chunk[1:].partition("\n")
    framed = sse_event(data.encode())
    return b"event: " + event.encode() + b"\n" + framed if event else framed


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keepalive\n\n"
