"""One error envelope, OpenAI's shape, for every error the app can answer."""
import logging

from flask import jsonify
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from services import database
from services.errors import ServiceError, envelope

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
    response = jsonify(envelope(message, type_, code, details))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def handle_service_error(exc: ServiceError):
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.details, exc.headers)


def handle_validation_error(exc: ValidationError):
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error_response(400, first_problem(messages), "invalid_request_error",
                          "validation_failed", messages)


def first_problem(messages) -> str:
    """`field: reason` for the first field (in sorted order) of marshmallow's
    messages; a nested field is named by its path (`llms.0.description`)."""
    path = []
    while isinstance(messages, dict) and messages:
        key = min(messages, key=str)
        path.append(str(key))
        messages = messages[key]
    while isinstance(messages, list | tuple) and messages:
        messages = messages[0]
    if path in ([], ["_schema"]):
        return str(messages)
    return f"{'.'.join(path)}: {messages}"


def handle_http_exception(exc: HTTPException):
    type_, code = HTTP_TYPES.get(exc.code, ("server_error", "http_error"))
    message = exc.description or exc.name
    if exc.code == 413:
        message = "Request body too large"
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    return error_response(exc.code, message, type_, code, headers=headers)


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
