"""Readiness: can this worker serve now? (`GET /readyz`; `/healthz` is liveness only.)"""
import logging

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from services.errors import Unavailable

log = logging.getLogger(__name__)


def readiness(session, bus) -> dict:
    """`{database: ok|fail, bus: ok|fail}`: one trivial query, and a ping of the
    bus (always ok in memory). Both are bounded by their connect timeouts."""
    checks = {}
    try:
        session.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        log.warning("readiness: database unavailable (%s)", type(exc).__name__)
        checks["database"] = "fail"
    finally:
        session.close()
    try:
        bus.ping()
        checks["bus"] = "ok"
    except Unavailable:
        checks["bus"] = "fail"
    return checks
