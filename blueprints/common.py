"""What every view shares: the caller, role checks and the JSON body."""
import functools

from flask import g, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from extensions import db
from models import utcnow
from services import tokens
from services.errors import Forbidden, Invalid


def authenticate_request():
    """`before_request` of the token-protected blueprints."""
    caller, touched = tokens.authenticate(db.session, request.headers.get("Authorization"),
                                          utcnow())
    if touched:
        db.session.commit()
    g.caller = caller


def caller() -> tokens.Caller:
    return g.caller


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
