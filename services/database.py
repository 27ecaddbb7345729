"""What the database's answers mean, and the bounds on every wait for it.

One place decides which failures a caller may retry (SQLSTATE on PostgreSQL,
the result code on SQLite; never the message text):

- `database_busy` (503, Retry-After): a lock not granted in time (55P03), a
  statement or lock wait cancelled by its timeout (57014), a deadlock
  (40P01) or serialization failure (40001) that PostgreSQL resolved by
  aborting us, SQLite's SQLITE_BUSY / SQLITE_LOCKED ("database is locked"),
  and a pool with no connection to hand out within its timeout;
- `database_unavailable` (503, Retry-After): the connection is lost or was
  never made: SQLSTATE class 08, 57P01-57P03 (the server shutting down or
  starting), a psycopg OperationalError without any server answer (refused,
  connect timeout, the socket closed), SQLite's SQLITE_CANTOPEN.

Anything else is a bug or bad data: a 500 whose log line names the error's
class and SQLSTATE but never its text, which on PostgreSQL may quote the
row's values (`DETAIL: Failing row contains (...)`, an api key among them).

The waits themselves are bounded by `engine_options` (the server's: pool
checkout, connect, `lock_timeout`, `statement_timeout`) and by
`maintenance_bounds` (longer ones for `flask db upgrade` and `flask gc-sweep`,
which work on whole tables).
"""
import enum
import logging
import math
import sqlite3
import traceback
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from services import sockets
from services.errors import Unavailable

log = logging.getLogger(__name__)


class Problem(enum.StrEnum):
    BUSY = "database_busy"
    UNAVAILABLE = "database_unavailable"


BUSY_SQLSTATES = {"55P03", "57014", "40P01", "40001"}
UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03"}
UNIQUE_VIOLATION, FOREIGN_KEY_VIOLATION = "23505", "23503"
# SQLite's primary result codes (the low byte of an extended code).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CANTOPEN, SQLITE_CONSTRAINT = 5, 6, 14, 19
SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY = 2067, 1555
SQLITE_CONSTRAINT_FOREIGNKEY = 787
RETRY_AFTER = {Problem.BUSY: "1", Problem.UNAVAILABLE: "5"}
MESSAGES = {Problem.BUSY: "The database is busy; retry shortly",
            Problem.UNAVAILABLE: "The database is unavailable; retry shortly"}


# -- what an error means ---------------------------------------------------------

def classify(exc: BaseException) -> Problem | None:
    """BUSY, UNAVAILABLE, or None (not a condition a retry can cure). Takes
    SQLAlchemy's wrapped errors and the driver's own alike."""
    if isinstance(exc, sa.exc.TimeoutError):  # the pool had no connection in time
        return Problem.BUSY
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return Problem.UNAVAILABLE
    orig = driver_error(exc)
    if isinstance(orig, sqlite3.Error):
        code = _sqlite_code(orig)
        if code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED):
            return Problem.BUSY
        if code & 0xFF == SQLITE_CANTOPEN:
            return Problem.UNAVAILABLE
        return None
    state = sqlstate(orig)
    if state in BUSY_SQLSTATES:
        return Problem.BUSY
    if state is not None and (state.startswith("08") or state in UNAVAILABLE_SQLSTATES):
        return Problem.UNAVAILABLE
    if state is None and _is_psycopg_operational(orig):
        return Problem.UNAVAILABLE  # no answer from a server at all
    return None


def is_busy(exc: BaseException) -> bool:
    return classify(exc) is Problem.BUSY


def unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 to answer for `exc` (with Retry-After), or None."""
    problem = classify(exc)
    if problem is None:
        return None
    return Unavailable(MESSAGES[problem], code=problem.value,
                       headers={"Retry-After": RETRY_AFTER[problem]})


def is_unique_violation(exc: BaseException) -> bool:
    """A unique or primary key constraint refused the row: someone else got
    there first."""
    orig = driver_error(exc)
    if isinstance(orig, sqlite3.Error):
        return _sqlite_code(orig) in (SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY)
    return sqlstate(orig) == UNIQUE_VIOLATION


def is_foreign_key_violation(exc: BaseException) -> bool:
    orig = driver_error(exc)
    if isinstance(orig, sqlite3.Error):
        return _sqlite_code(orig) == SQLITE_CONSTRAINT_FOREIGNKEY
    return sqlstate(orig) == FOREIGN_KEY_VIOLATION


def driver_error(exc: BaseException) -> BaseException:
    """The DBAPI driver's exception inside a SQLAlchemy one (else `exc`)."""
    return getattr(exc, "orig", None) or exc


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE PostgreSQL answered with (None: no server answer, or not
    PostgreSQL)."""
    return getattr(driver_error(exc), "sqlstate", None)


def describe(exc: BaseException) -> str:
    """A log line's worth about a database error that quotes no value: its
    classes, SQLSTATE or SQLite code, the table and constraint it names, and
    the statement (whose parameters the engine hides)."""
    orig = driver_error(exc)
    parts = [type(exc).__name__]
    if orig is not exc:
        parts.append(f"{type(orig).__module__}.{type(orig).__name__}")
    if isinstance(orig, sqlite3.Error):
        parts.append(f"sqlite {getattr(orig, 'sqlite_errorname', None) or 'error'}")
    elif sqlstate(orig):
        parts.append(f"SQLSTATE {sqlstate(orig)}")
        diag = getattr(orig, "diag", None)
        for name in ("table_name", "column_name", "constraint_name"):
            value = getattr(diag, name, None)
            if value:
                parts.append(f"{name.removesuffix('_name')} {value}")
    statement = getattr(exc, "statement", None)
    if statement:
        parts.append(f"in: {' '.join(statement.split())[:500]}")
    return "; ".join(parts)


def log_unexpected(exc: BaseException, what: str) -> None:
    """Log a database error with where it came from, but without its text."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s: %s\nTraceback (most recent call last):\n%s", what, describe(exc), stack)


def without_nul(value):
    """`value` with every NUL character in its strings (keys included, at any
    depth) replaced by U+FFFD: for text that is stored but was not ours to
    refuse (an LLM's answer). Request bodies refuse NULs instead (schemas/)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list | tuple):
        return [without_nul(item) for item in value]
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    return value


def _sqlite_code(exc: sqlite3.Error) -> int:
    return getattr(exc, "sqlite_errorcode", None) or 0


def _is_psycopg_operational(exc) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover  (psycopg is pinned)
        return False
    return isinstance(exc, psycopg.OperationalError)


# -- the bounds --------------------------------------------------------------------

def engine_options(uri: str, config) -> dict:
    """SQLAlchemy engine options for `uri` from the settings: a pool sized for
    gevent (many greenlets, few connections) whose checkout waits at most
    DATABASE_POOL_TIMEOUT, and on PostgreSQL a connect timeout and
    server-side lock and statement timeouts. (`check_before_use` replaces
    `pool_pre_ping`'s round trip.)"""
    url = make_url(uri)
    options = {
        # A database error's message would otherwise quote the statement's
        # parameters, an LLM's api_key among them, into logs.
        "hide_parameters": True,
    }
    if not (url.drivername.startswith("sqlite") and url.database in (None, "", ":memory:")):
        # Whole seconds: Flask-SQLAlchemy's engine_from_config makes it an int.
        options.update(pool_size=int(config["DATABASE_POOL_SIZE"]),
                       max_overflow=int(config["DATABASE_MAX_OVERFLOW"]),
                       pool_timeout=math.ceil(float(config["DATABASE_POOL_TIMEOUT"])))
    if url.drivername.startswith("sqlite"):
        # SQLite's busy wait blocks the whole gevent worker, so keep it short;
        # a lock held longer is a 503 with Retry-After (blueprints/errors.py).
        options["connect_args"] = {"timeout": float(config["SQLITE_BUSY_TIMEOUT"])}
    elif url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": max(1, round(float(
            config["DATABASE_CONNECT_TIMEOUT"])))}
        server_options = " ".join(
            f"-c {name}={milliseconds(config[key])}"
            for name, key in (("lock_timeout", "DATABASE_LOCK_TIMEOUT"),
                              ("statement_timeout", "DATABASE_STATEMENT_TIMEOUT"))
            if float(config[key]) > 0)
        if server_options:  # appended to any `options` the URL itself carries
            given = url.query.get("options")
            connect_args["options"] = f"{given} {server_options}" if given else server_options
        options["connect_args"] = connect_args
    return options


def check_before_use(engine) -> None:
    """Hand out no pooled PostgreSQL connection that the server has closed
    (a restart, `pg_terminate_backend`, an idle timeout), without
    `pool_pre_ping`'s round trip on every checkout: a connection at rest has
    nothing to say, so one whose socket is readable holds the server's
    farewell (its FATAL message, or the end of the stream). The pool then
    opens a new one in its place (up to three times, then the error is
    `database_unavailable`). A connection fresh from connecting is not
    checked: it may still hold unread handshake bytes."""
    if engine.dialect.name != "postgresql":
        return  # SQLite's connections are files: nothing can close them under us

    @sa.event.listens_for(engine, "checkin")
    def rested(_dbapi_connection, record):
        record.info["rested"] = True

    @sa.event.listens_for(engine, "checkout")
    def still_open(dbapi_connection, record, _proxy):
        if record.info.get("rested") and _has_input(dbapi_connection):
            raise sa.exc.DisconnectionError("the server closed this pooled connection")


def _has_input(dbapi_connection) -> bool:
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # closed already  # noqa: BLE001
        return True
    return sockets.has_input(fd)


def reads_alone(session) -> None:
    """The session's reads until it closes run in autocommit, each SELECT one
    round trip without BEGIN and ROLLBACK, when no transaction is open yet:
    for a request that only reads before it waits (an inference's route).
    Inside an open transaction it changes nothing. SQLite's driver begins
    transactions before writes only, so there it would only cost the
    isolation level's switch and reset (~35 µs a request)."""
    if not session.in_transaction() and session.get_bind().dialect.name != "sqlite":
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def milliseconds(seconds) -> int:
    """A duration setting (seconds) as PostgreSQL's milliseconds (at least 1)."""
    return max(1, round(float(seconds) * 1000))


@contextmanager
def maintenance_bounds(connection, config):
    """Within the block, the waits of `connection` (a SQLAlchemy Connection,
    in its transaction) are bounded by MAINTENANCE_LOCK_TIMEOUT and
    MAINTENANCE_STATEMENT_TIMEOUT instead of the server's: `flask db upgrade`
    and `flask gc-sweep` rewrite or scan whole tables. On PostgreSQL they are
    SET LOCAL (they end with the transaction); SQLite's busy timeout is put
    back when the block ends."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(
            sa.text("SELECT set_config('lock_timeout', :lock, true), "
                    "set_config('statement_timeout', :statement, true)"),
            {"lock": str(milliseconds(config["MAINTENANCE_LOCK_TIMEOUT"])),
             "statement": str(milliseconds(config["MAINTENANCE_STATEMENT_TIMEOUT"]))})
        yield
        return
    if dialect != "sqlite":
        yield
        return
    raw = connection.connection.dbapi_connection
    raw.execute(f"PRAGMA busy_timeout = {milliseconds(config['MAINTENANCE_LOCK_TIMEOUT'])}")
    try:
        yield
    finally:
        raw.execute(f"PRAGMA busy_timeout = {milliseconds(config['SQLITE_BUSY_TIMEOUT'])}")


def try_transaction_lock(session, key: int) -> bool:
    """Take PostgreSQL's transaction-level advisory lock `key` if no other
    transaction holds it (it is released at commit or rollback). True on
    other engines: SQLite's single writer already serializes."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.execute(sa.select(sa.func.pg_try_advisory_xact_lock(key))).scalar())
