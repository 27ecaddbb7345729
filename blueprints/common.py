"""What every view shares: the caller, role checks and the JSON body."""
import _socket
import functools
import os

from flask import current_app, g, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

import settings
from extensions import db
from models import utcnow
from services import lifecycle, tokens
from services.api_keys import ApiKeyCipher
from services.errors import Forbidden, Invalid


def refuse_nul_in_url():
    """App-level `before_request`, first of all: a NUL character in the path
    (`%00`) or the query is a 400. It can name nothing we have, and
    PostgreSQL could not even look it up. Only a query with `%00` (or a raw
    NUL) in it is decoded for this: most have none, or no query at all."""
    query = request.query_string
    if "\x00" in request.path or ((b"%00" in query or b"\x00" in query) and any(
            "\x00" in key or "\x00" in value for key, value in request.args.items(multi=True))):
        raise Invalid("The URL must not contain NUL characters (%00)", code="invalid_url")


def authenticate_request():
    """`before_request` of the token-protected blueprints. A browser's CORS
    preflight carries no token by design: refuse_foreign_preflight has judged it."""
    if is_preflight():
        return
    caller, touched = tokens.authenticate(db.session, authorization(), utcnow(),
                                          current_app.extensions["token_cache"])
    if touched:
        db.session.commit()
    g.caller = caller


# Anthropic's SDKs send the token as `x-api-key`; it counts on its routes.
ANTHROPIC_PATHS = frozenset({"/v1/messages"})


def authorization() -> str | None:
    """The request's `Authorization` header; on Anthropic's routes, a bare
    `x-api-key` as its bearer token."""
    header = request.headers.get("Authorization")
    if header is None and request.path in ANTHROPIC_PATHS and "x-api-key" in request.headers:
        header = f"Bearer {request.headers['x-api-key']}"
    return header


def authenticate_unmatched():
    """App-level `before_request`: an unknown path or method under the API
    still needs a token, so a caller without one learns 401, not 404/405."""
    if request.endpoint is None and request.path.startswith(PROTECTED_PREFIXES):
        authenticate_request()


PROTECTED_PREFIXES = ("/api/", "/v1/")


def is_preflight() -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def refuse_foreign_preflight():
    """App-level `before_request`: a preflight from an origin that is not in
    SWITCHBOARD_CORS_ORIGINS gets a 403 saying so (not a 401: a preflight
    never carries a token); one from a listed origin gets Flask's automatic
    OPTIONS answer, which flask-cors fills in."""
    if not is_preflight() or not request.path.startswith(PROTECTED_PREFIXES):
        return
    origin = request.headers["Origin"]
    allowed = settings.cors_origins(current_app.config)
    if origin.rstrip("/") not in allowed and "*" not in allowed:
        raise Forbidden(f"Origin {origin} may not call this server from a browser; an operator "
                        f"can allow it in SWITCHBOARD_CORS_ORIGINS", code="cors_origin_not_allowed")


def caller() -> tokens.Caller:
    return g.caller


def check_session_owner(session_id) -> None:
    """The caller's own session (or an admin's call), else NotFound / Forbidden."""
    lifecycle.check_session_owner(db.session, caller(), session_id,
                                  current_app.extensions["session_owner_cache"])


def api_key_cipher() -> ApiKeyCipher:
    return current_app.extensions["api_key_cipher"]


def require_migrated_schema():
    """App-level `before_request` (the first): until the database is found
    migrated once, every request but the health checks and the OpenAPI document asks it, and gets a 503
    saying to run `flask db upgrade` instead of a 500 from a missing table."""
    check = current_app.extensions["schema_check"]
    if not check.current and request.blueprint not in ("health", "openapi"):
        check.require(db.session.connection())


def require(*roles):
    """Only these roles (admin always) may call the view; others get 403."""
    allowed = {str(r) for r in roles} | {"admin"}

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if g.caller.role not in allowed:
                raise Forbidden(f"A {g.caller.role} token may not do this",
                                code="role_forbidden")
            return view(*args, **kwargs)
        return wrapper
    return decorator


def json_body(schema=None, **load_kwargs):
    """The request's JSON object, validated by `schema` when given."""
    reject_oversized_stream()
    try:
        data = request.get_json(force=True)
    except BadRequest:
        raise Invalid("Malformed JSON body", code="malformed_json") from None
    if not isinstance(data, dict):
        raise Invalid("The body must be a JSON object", code="malformed_json")
    return schema.load(data, **load_kwargs) if schema is not None else data


def reject_oversized_stream():
    """413 for a body without Content-Length (chunked) over MAX_CONTENT_LENGTH.

    Werkzeug stops reading such a body at the limit and hands back the
    truncated bytes, which would otherwise be a misleading 400. A body of
    exactly the limit is fine: the server's input then has nothing more.
    """
    limit = request.max_content_length
    if request.content_length is not None or limit is None:
        return  # Werkzeug checks a declared length itself
    if len(request.get_data(cache=True)) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def peer_connected(environ):
    """A cheap check that the caller still holds this connection (under
    gunicorn; None elsewhere): tasks are not handed to a poll whose publisher
    hung up, and a client that left cancels its task."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def connected():
        # A plain (not gevent) duplicate of the socket: a peek that never waits.
        try:
            probe = _socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return False
        try:
            return probe.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: still connected
        except OSError:
            return False
        finally:
            probe.close()
    return connected
