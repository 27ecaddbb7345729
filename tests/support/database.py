"""Another real connection to a test's own database, whatever the engine: to
see only what is committed, to change rows behind the app's back, to hold
the locks a cron `gc-sweep` or a migration would hold, and to line up two
transactions at the moment they race.

    with other_connection(app) as conn:
        conn.execute(sa.text("UPDATE chat_message SET status = 'error'"))

    lock = WriteLock(app)
    lock.take()     # reads go on, every write waits (and times out)
    lock.release()
"""
import threading
import time
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from extensions import db
from tests.support import stack


def database_url(app) -> str:
    return app.config["SQLALCHEMY_DATABASE_URI"]


def other_engine(app) -> sa.Engine:
    """An engine of its own on the app's database (no pool: nothing stays open)."""
    return sa.create_engine(database_url(app), poolclass=NullPool)


@contextmanager
def other_connection(app):
    """A connection of another engine, in a transaction committed at the end."""
    engine = other_engine(app)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def pg_only(reason="PostgreSQL only"):
    import pytest

    return pytest.mark.skipif(stack.DB != "postgres", reason=reason)


class WriteLock:
    """The whole database's write lock, held from another connection: on
    SQLite `BEGIN IMMEDIATE`, on PostgreSQL every table `IN EXCLUSIVE MODE`
    (reads go on, writes wait). What a gc-sweep from cron holds on SQLite, and
    the worst a long transaction can do on PostgreSQL."""

    def __init__(self, app):
        self.engine = other_engine(app)
        self.connection = None

    def take(self):
        assert self.connection is None, "already taken"
        self.connection = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            self.connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        tables = ", ".join(f'"{table.name}"' for table in db.metadata.sorted_tables)
        self.connection.exec_driver_sql("SET lock_timeout = '10s'")
        self.connection.exec_driver_sql(f"LOCK TABLE {tables} IN EXCLUSIVE MODE")

    def release(self):
        if self.connection is not None:
            self.connection.rollback()
            self.connection.close()
            self.connection = None

    def close(self):
        self.release()
        self.engine.dispose()


@contextmanager
def barrier_before(engine, statement_prefix: str, parties: int = 2, timeout: float = 10.0):
    """Hold each of `parties` threads just before its first statement on
    `engine` that starts with `statement_prefix` (e.g. "INSERT INTO llm"),
    until all are there: their checks are done and their writes race."""
    barrier = threading.Barrier(parties, timeout=timeout)
    passed = threading.local()

    def hold(_conn, _cursor, statement, *_):
        if not getattr(passed, "done", False) and statement.lstrip().upper().startswith(
                statement_prefix.upper()):
            passed.done = True
            barrier.wait()

    sa.event.listen(engine, "before_cursor_execute", hold)
    try:
        yield barrier
    finally:
        sa.event.remove(engine, "before_cursor_execute", hold)


def backends_waiting_for_a_lock(app) -> int:
    """PostgreSQL: how many connections to the app's database wait for a lock."""
    with other_connection(app) as conn:
        return conn.scalar(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"))


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02):
    """Poll `condition()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(interval)
