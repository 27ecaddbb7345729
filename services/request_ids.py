"""Request ids (DESIGN.md, "Operations"): the client's own `X-Request-Id`
when it is sane, else a new one; the id of the request being served now.

The id lives in a context variable: under gevent each greenlet has its own
context, so a request's greenlet sees its own id in every log line and in
what it sends on (the publisher's task, a public upstream's header). A thread
started for a request starts empty: hand it the id explicitly.
"""
import contextvars
import logging
import os

from marshmallow import ValidationError, fields, validate

HEADER = "X-Request-Id"
# 1-128 characters of A-Za-z0-9._- (anything else: a new id).
_SANE = fields.String(validate=validate.Regexp(r"^[A-Za-z0-9._-]{1,128}\Z"))

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def accept(header: str | None) -> str:
    """The client's id when it is sane, else a new one."""
    if header:
        try:
            return _SANE.deserialize(header)
        except ValidationError:
            pass
    return new()


def new() -> str:
    """32 random hex digits (a uuid4's entropy, a third of its cost)."""
    return os.urandom(16).hex()


def current() -> str | None:
    """The id of the request this greenlet serves, or None outside one."""
    return _current.get()


def bind(request_id: str | None) -> None:
    """Make `request_id` this greenlet's (None: it serves no request now)."""
    _current.set(request_id)


class RequestIdFilter(logging.Filter):
    """Puts `request_id` on every record a handler writes ("-" outside a request)."""

    def __init__(self, missing: str | None = "-"):
        super().__init__()
        self.missing = missing

    def filter(self, record):
        if getattr(record, "request_id", None) is None:
            record.request_id = _current.get() or self.missing
        return True
