"""What a worker remembers of public LLMs' rows, so that an inference on one
reads nothing from the database.

A public LLM's row changes only through the admin API (PATCH, DELETE):
publishers cannot publish over one and gc-sweep never touches one. So a
worker keeps the `Target` it read for a public LLM, tagged with the task
bus's routes version as it stood before the read (`TaskBus.routes_version`),
and a PATCH or DELETE moves that version on every worker as it commits
(`changed_in`). A call on a remembered target checks the version in the same
bus call that counts it against MAX_PENDING_PER_LLM (`acquire_slot`), so it
costs no round trip of its own: when the version has moved, the slot is not
taken (RoutesChanged), and the call reads the row again and goes on with it.
The check is exact: a call that starts after a PATCH was answered never uses
the row from before it.

The version moves before the commit, so a change the bus cannot hear of is
refused (503 `bus_unavailable`, rolled back), and again after it, for calls
that read the row while the transaction was being committed (should Redis
go in between, the bus makes that second move as soon as it can). Only public
LLMs that go straight to their upstream are remembered; virtual LLMs, pools
and LLMs with a declared capacity (the fair queue) are read every time.
"""
import dataclasses
import time

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.orm import Session

from models import Kind
from services.bus.base import RoutesChanged
from services.cache import TtlMap
from services.errors import Unavailable
from services.inference import POOL_PREFIX, Route, single_route

ROUTE_TTL = 60.0      # an entry lapses after this long (the memory it takes is bounded)
MAX_ROUTES = 10_000
_CHANGED = "public_llms_changed"  # Session.info key: this transaction changes a public LLM


class RouteCache:
    """Public LLMs' targets by name, each with the routes version it was read
    at (see the module docstring). One per app, over the app's task bus."""

    def __init__(self, bus, ttl: float = ROUTE_TTL, maxsize: int = MAX_ROUTES,
                 timer=time.monotonic):
        self._bus = bus
        self._targets = TtlMap(ttl, maxsize, timer)
        self._elsewhere = TtlMap(ttl, maxsize, timer)  # names last read as something else

    def route(self, name: str, endpoint: str, read) -> Route:
        """Where `name` runs for `endpoint`: the target remembered for a public
        LLM (its `seen_at` set: the call must check it), or `read()`
        (services/inference.route on the database)."""
        if name.startswith(POOL_PREFIX):
            return read()
        target = self._targets.get(name)
        if target is not None and endpoint in target.endpoints:
            return single_route(target, endpoint)
        return self.read(name, read)

    def read(self, name: str, read) -> Route:
        """`read()`, remembering the target when it is a public LLM's; the
        route returned needs no check."""
        version = None if self._elsewhere.get(name) else self._version()
        route = read()
        target = route.targets[0]
        if target.kind != Kind.PUBLIC or target.max_concurrency is not None:
            self._elsewhere.put(name, True)
            self._targets.discard(name)
        elif version is not None:
            self._targets.put(name, dataclasses.replace(target, seen_at=version))
        else:   # read as something else before: remembered from the next read on
            self._elsewhere.discard(name)
        return route

    def _version(self) -> str | None:
        try:
            return self._bus.routes_version()
        except Unavailable:   # read all the same: an unknown LLM is still a 404
            return None

    def run(self, name: str, endpoint: str, read, call):
        """`call(route)` on `name`'s route; once more on the row read again
        when the remembered one may have changed."""
        try:
            return call(self.route(name, endpoint, read))
        except RoutesChanged:
            self._targets.discard(name)
            return call(self.read(name, read))


def changed_in(session) -> None:
    """`session`'s transaction changes (updates or deletes) a public LLM's
    row: the routes version moves as it commits."""
    session.info[_CHANGED] = True


@sa.event.listens_for(Session, "before_commit")
def _before_commit(session):
    if session.info.get(_CHANGED):
        current_app.extensions["task_bus"].routes_changed()   # Unavailable: no commit


@sa.event.listens_for(Session, "after_commit")
def _after_commit(session):
    if session.info.pop(_CHANGED, None):
        current_app.extensions["task_bus"].routes_changed(later_if_unreachable=True)


@sa.event.listens_for(Session, "after_rollback")
def _after_rollback(session):
    session.info.pop(_CHANGED, None)
