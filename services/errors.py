"""The errors services raise. One handler (blueprints/errors.py) turns each
into the OpenAI-shaped envelope with its HTTP status."""


class ServiceError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message, *, code=None, details=None, headers=None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or {}
        self.headers = headers or {}

    def to_data(self) -> dict:
        """The error as JSON-able data (stored by the bus; see `from_data`)."""
        return {"status": self.status, "code": self.code, "message": self.message,
                "details": self.details, "headers": self.headers}


class Invalid(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ServiceError):
    status, type, code = 401, "authentication_error", "invalid_token"


class Forbidden(ServiceError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ServiceError):
    status, type, code = 404, "not_found_error", "not_found"


class Conflict(ServiceError):
    status, type, code = 409, "conflict_error", "conflict"


class Gone(ServiceError):
    status, type, code = 410, "gone_error", "gone"


class TooManyRequests(ServiceError):
    status, type, code = 429, "rate_limit_error", "too_many_pending"


class ClientGone(ServiceError):
    """The client hung up while waiting; nobody reads this (nginx's 499)."""

    status, type, code = 499, "client_gone", "client_gone"


class BadGateway(ServiceError):
    status, type, code = 502, "upstream_error", "bad_gateway"


class Unavailable(ServiceError):
    status, type, code = 503, "unavailable", "publisher_offline"


class GatewayTimeout(ServiceError):
    status, type, code = 504, "timeout", "timeout"


def envelope(message, type_, code, details=None):
    return {"error": {"message": message, "type": type_, "code": code, "details": details or {}}}


# Anthropic's error types by HTTP status (others: api_error for 5xx,
# invalid_request_error for 4xx).
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_envelope(status: int, message: str) -> dict:
    """Anthropic's error body, for errors we make on /v1/messages."""
    type_ = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}}


def from_data(data: dict) -> ServiceError:
    """A fresh exception from `ServiceError.to_data()`: each waiter raises its own."""
    cls = _BY_STATUS.get(data.get("status"), ServiceError)
    return cls(data["message"], code=data.get("code"), details=data.get("details"),
               headers=data.get("headers"))


_BY_STATUS = {cls.status: cls for cls in (
    Invalid, Unauthorized, Forbidden, NotFound, Conflict, Gone, TooManyRequests, BadGateway,
    Unavailable, GatewayTimeout)}


def bus_unavailable() -> Unavailable:
    return Unavailable("The task bus is unavailable; retry shortly", code="bus_unavailable",
                       headers={"Retry-After": "1"})
