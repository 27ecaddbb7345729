"""One error envelope, OpenAI's shape, for every error the app can answer."""
import logging
import re

from flask import current_app, jsonify, request
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from blueprints.common import ANTHROPIC_PATHS
from blueprints.instrumentation import note_rejection
from services import database
from services.errors import ServiceError, anthropic_envelope, envelope

log = logging.getLogger(__name__)

HTTP_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_token"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "body_too_large"),
}


def error_response(status, message, type_, code, details=None, headers=None):
    """Our envelope; Anthropic's on its routes, whose SDKs read only that."""
    if request.path in ANTHROPIC_PATHS:
        response = jsonify(anthropic_envelope(status, message))
    else:
        response = jsonify(envelope(message, type_, code, details))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def handle_service_error(exc: ServiceError):
    if exc.status in (429, 503):
        note_rejection(exc.code)
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.details, exc.headers)


def handle_validation_error(exc: ValidationError):
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error_response(400, validation_message(messages), "invalid_request_error",
                          "validation_failed", messages)


def validation_message(messages: dict) -> str:
    """The first field (a dotted path into nested bodies) and its reason, e.g.
    `messages: Shorter than minimum length 1.`: SDKs show only the message."""
    errors = list(_flatten(messages))
    if not errors:
        return "Invalid request body"
    path, reason = errors[0]
    message = f"{path}: {reason}" if path else reason
    if len(errors) > 1:
        more = len(errors) - 1
        message += f" ({more} more {'error' if more == 1 else 'errors'} in details)"
    return message


def _flatten(messages, path=()):
    """(dotted path, reason) of every message, in the order marshmallow gave them."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            yield from _flatten(value, path if key == "_schema" else (*path, str(key)))
    elif isinstance(messages, list | tuple):
        for item in messages:
            yield from _flatten(item, path)
    else:
        yield ".".join(path), str(messages)


def handle_http_exception(exc: HTTPException):
    if exc.code == 404 and (request.path + "/").startswith("/v1/"):
        return v1_not_found()
    type_, code = HTTP_TYPES.get(exc.code, ("server_error", "http_error"))
    message = exc.description or exc.name
    if exc.code == 413:
        message = "Request body too large"
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    return error_response(exc.code, message, type_, code, headers=headers)


def v1_not_found():
    """OpenAI clients show only the message: name the routes that do exist."""
    routes = sorted(
        (rule.rule, method) for rule in current_app.url_map.iter_rules()
        if rule.rule.startswith("/v1/") for method in rule.methods - {"HEAD", "OPTIONS"})
    served = ", ".join(f"{method} {_placeholders(path)}" for path, method in routes)
    return error_response(
        404, f"{request.method} {request.path} is not an endpoint of this server; "
             f"under /v1 it serves {served}", "invalid_request_error", "unsupported_endpoint")


def _placeholders(rule: str) -> str:
    """`/v1/models/<path:model_id>` → `/v1/models/{model_id}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def handle_unexpected(exc: Exception):
    log.exception("unhandled error")
    return error_response(500, "Internal server error", "server_error", "internal_error")


def handle_database_error(exc: DBAPIError | PoolTimeout):
    """A wait that ran out or a lost connection is a 503 (services/database.py
    decides which); anything else is a 500 logged without the error's text,
    which may quote a row's values."""
    error = database.unavailable(exc)
    if error is not None:
        log.warning("%s: %s", error.code, database.describe(exc))
        return handle_service_error(error)
    database.log_unexpected(exc, "unhandled database error")
    return error_response(500, "Internal server error", "server_error", "internal_error")


def register_errorhandlers(app):
    app.register_error_handler(ServiceError, handle_service_error)
    app.register_error_handler(DBAPIError, handle_database_error)
    app.register_error_handler(PoolTimeout, handle_database_error)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
