"""Every wait for the database is bounded, and what a failed wait means is
decided by SQLSTATE (SQLite: its result code), never by message text:
`database_busy` and `database_unavailable` are 503s with Retry-After, on
both engines. Real databases throughout: another connection holds the
locks, the server itself raises the SQLSTATEs."""
import socket
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app import create_app
from extensions import db
from models import Llm, new_id, utcnow
from services import database, gc
from tests.support import stack
from tests.support.database import WriteLock, other_connection, other_engine, pg_only
from tests.support.waiting import wait_until

LOCKED = {"SQLITE_BUSY_TIMEOUT": 0.2, "DATABASE_LOCK_TIMEOUT": 0.2}


def envelope_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json["error"]


def add_route(app, path, view):
    app.add_url_rule(path, path.strip("/"), view)


# -- the pool ----------------------------------------------------------------------

@pytest.mark.parametrize("app_config", [{"DATABASE_POOL_SIZE": 1, "DATABASE_MAX_OVERFLOW": 0,
                                         "DATABASE_POOL_TIMEOUT": 1}])
def test_a_request_that_gets_no_pooled_connection_in_time_is_503_database_busy(
        app, client, auth):
    with app.app_context():
        held = db.engine.connect()  # the pool's only connection
    started = time.monotonic()
    try:
        response = client.get("/api/v1/llms", headers=auth("client"))
    finally:
        held.close()
    assert envelope_of(response, 503)["code"] == "database_busy"
    assert response.headers["Retry-After"] == "1"
    assert 0.9 < time.monotonic() - started < 5
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200


def test_the_pool_is_sized_from_the_settings(tmp_path):
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}",
                      "DATABASE_POOL_SIZE": 3, "DATABASE_MAX_OVERFLOW": 4,
                      "DATABASE_POOL_TIMEOUT": 1.5})
    with app.app_context():
        pool = db.engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 4, 2)  # whole seconds
        db.engine.dispose()


# -- PostgreSQL's own bounds ------------------------------------------------------------

def settings_with(**overrides):
    import settings

    return {**settings.DEFAULTS, **overrides}


def test_postgresql_connections_get_the_timeouts_as_startup_options_after_the_urls_own():
    options = database.engine_options(
        "postgresql+psycopg://u@h/db?options=-c%20search_path%3Dsb",
        settings_with(DATABASE_LOCK_TIMEOUT=2, DATABASE_STATEMENT_TIMEOUT=30.5,
                      DATABASE_CONNECT_TIMEOUT=5))
    assert options["connect_args"] == {
        "connect_timeout": 5,
        "options": "-c search_path=sb -c lock_timeout=2000 -c statement_timeout=30500"}


def test_timeouts_of_zero_send_no_startup_options_for_a_pgbouncer_that_refuses_them():
    options = database.engine_options(
        "postgresql+psycopg://u@h/db",
        settings_with(DATABASE_LOCK_TIMEOUT=0, DATABASE_STATEMENT_TIMEOUT=0))
    assert "options" not in options["connect_args"]


@pg_only()
@pytest.mark.parametrize("app_config", [{"DATABASE_LOCK_TIMEOUT": 1.5,
                                         "DATABASE_STATEMENT_TIMEOUT": 0.3}])
def test_every_connection_carries_the_lock_and_statement_timeouts(ctx):
    assert db.session.scalar(sa.text("SHOW lock_timeout")) == "1500ms"
    assert db.session.scalar(sa.text("SHOW statement_timeout")) == "300ms"


@pg_only()
@pytest.mark.parametrize("app_config", [{"DATABASE_STATEMENT_TIMEOUT": 0.2}])
def test_a_statement_past_the_statement_timeout_is_503_database_busy(app, client):
    add_route(app, "/slow", lambda: str(db.session.scalar(sa.text("SELECT pg_sleep(5)"))))
    started = time.monotonic()
    response = client.get("/slow")
    assert envelope_of(response, 503)["code"] == "database_busy"
    assert time.monotonic() - started < 4  # pg_sleep(5) was cut short


@pg_only()
@pytest.mark.parametrize("app_config", [LOCKED])
def test_a_row_lock_held_past_the_lock_timeout_is_503_database_busy(app, client, auth):
    client.post("/api/v1/llms", headers=auth("admin"),
                json={"name": "held", "model": "m", "url": "http://127.0.0.1:9/v1"})
    engine = other_engine(app)
    try:
        with engine.begin() as holder:
            holder.execute(sa.text("SELECT id FROM llm WHERE name = 'held' FOR UPDATE"))
            response = client.patch("/api/v1/llms/held", headers=auth("admin"),
                                    json={"description": "d"})
    finally:
        engine.dispose()
    assert envelope_of(response, 503)["code"] == "database_busy"
    assert response.headers["Retry-After"] == "1"


# -- what a failure means: by SQLSTATE, not by text ---------------------------------------

@pg_only()
@pytest.mark.parametrize("state, code", [
    ("55P03", "database_busy"),          # lock_not_available
    ("57014", "database_busy"),          # query_canceled (statement or lock timeout)
    ("40P01", "database_busy"),          # deadlock_detected
    ("40001", "database_busy"),          # serialization_failure
    ("08006", "database_unavailable"),   # connection_failure
    ("57P01", "database_unavailable"),   # admin_shutdown
    ("57P03", "database_unavailable"),   # cannot_connect_now
])
def test_the_servers_sqlstate_decides_busy_or_unavailable(app, client, state, code):
    add_route(app, "/raise", lambda: str(db.session.execute(sa.text(
        f"DO $$ BEGIN RAISE EXCEPTION 'some text' USING ERRCODE = '{state}'; END $$"))))
    response = client.get("/raise")
    error = envelope_of(response, 503)
    assert error["code"] == code
    assert response.headers["Retry-After"] in ("1", "5")
    assert "some text" not in response.get_data(as_text=True)


@pg_only()
def test_a_message_that_reads_like_a_lock_is_not_taken_for_one(app, client):
    add_route(app, "/raise", lambda: str(db.session.execute(sa.text(
        "DO $$ BEGIN RAISE EXCEPTION 'database is locked'; END $$"))))
    error = envelope_of(client.get("/raise"), 500)
    assert error["message"] == "Internal server error"


@pg_only()
def test_a_connection_the_server_ends_mid_request_is_503_database_unavailable(app, client):
    add_route(app, "/killed", lambda: str(db.session.execute(sa.text(
        "SELECT pg_terminate_backend(pg_backend_pid())"))))
    response = client.get("/killed")
    assert envelope_of(response, 503)["code"] == "database_unavailable"
    assert response.headers["Retry-After"] == "5"


@pg_only()
def test_a_pooled_connection_the_server_closed_is_replaced_before_use(app, client, auth):
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200
    with other_connection(app) as admin:  # every other backend of this database
        ended = admin.scalar(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    assert ended >= 1
    with other_connection(app) as admin:  # the server has closed them
        wait_until(lambda: not admin.scalar(sa.text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")),
            message="the terminated backends are gone")
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200


def unreachable_database_url(tmp_path):
    if stack.DB == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return stack.sqlalchemy_url(f"postgresql://postgres@127.0.0.1:{port}/nothing")


def test_a_database_that_cannot_be_reached_is_503_database_unavailable(tmp_path):
    app = create_app({"TESTING": True,
                      "SQLALCHEMY_DATABASE_URI": unreachable_database_url(tmp_path)})
    response = app.test_client().get("/api/v1/llms", headers={"Authorization": "Bearer x"})
    error = envelope_of(response, 503)
    assert error["code"] == "database_unavailable"
    assert response.headers["Retry-After"] == "5"
    assert error["message"] == "The database is unavailable; retry shortly"


@pg_only()
def test_a_server_that_never_answers_is_503_within_the_connect_timeout():
    with socket.socket() as silent:  # accepts, then says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = stack.sqlalchemy_url(f"postgresql://postgres@127.0.0.1:{port}/nothing")
        app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url,
                          "DATABASE_CONNECT_TIMEOUT": 2})
        started = time.monotonic()
        response = app.test_client().get("/api/v1/llms",
                                         headers={"Authorization": "Bearer x"})
        elapsed = time.monotonic() - started
    assert envelope_of(response, 503)["code"] == "database_unavailable"
    assert 1.5 < elapsed < 6


# -- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("app_config", [LOCKED])
def test_a_cli_command_on_a_busy_database_is_a_one_line_error(app, runner):
    lock = WriteLock(app)
    lock.take()
    try:
        result = runner.invoke(args=["tokens", "create", "ci", "--role", "client"])
    finally:
        lock.close()
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "Error: The database is busy; retry shortly (database_busy)\n"


# -- maintenance: gc-sweep and migrations have bounds of their own -------------------------

def insert_stale_llms(app, count):
    now = utcnow()
    with other_connection(app) as conn:
        conn.execute(sa.insert(Llm), [
            {"id": new_id(), "name": f"stale-{i}", "model": "m", "url": "", "type": "openai",
             "tier": "fast", "description": "", "extra_config": {}, "version": 1,
             "created_at": now, "updated_at": now, "kind": "virtual",
             "provider_session_id": "s", "status": "active",
             "last_heartbeat_at": now - timedelta(hours=1)}
            for i in range(count)])


@pg_only()
@pytest.mark.parametrize("app_config", [{"DATABASE_STATEMENT_TIMEOUT": 0.01,
                                         "MAINTENANCE_STATEMENT_TIMEOUT": 120}])
def test_gc_sweep_outlasts_the_servers_statement_timeout_on_a_big_table(app, runner):
    insert_stale_llms(app, 30_000)
    with app.app_context():  # under the server's bound, the sweep cannot finish
        with pytest.raises(sa.exc.OperationalError) as refused:
            gc.sweep(db.session, utcnow(), heartbeat_timeout=90, retention=14400)
        db.session.rollback()
    assert database.sqlstate(refused.value) == "57014"
    result = runner.invoke(args=["gc-sweep", "--json"])
    assert result.exit_code == 0, result.output
    assert '"marked_inactive":30000' in result.stdout


@pg_only()
@pytest.mark.parametrize("app_config", [{"DATABASE_LOCK_TIMEOUT": 30,
                                         "MAINTENANCE_LOCK_TIMEOUT": 0.3}])
def test_gc_sweep_waits_for_a_table_lock_at_most_the_maintenance_lock_timeout(app, runner):
    lock = WriteLock(app)
    lock.take()
    started = time.monotonic()
    try:
        result = runner.invoke(args=["gc-sweep", "--json"])
    finally:
        lock.close()
    assert result.exit_code == 1
    assert "database_busy" in result.stderr
    assert "Traceback" not in result.output
    assert time.monotonic() - started < 10  # not the server's 30 s


def test_describe_names_the_error_but_quotes_no_value(app):
    with app.app_context():
        db.session.add(Llm(name="x", model="m", url="", api_key="sk-quoted"))
        db.session.commit()
        db.session.add(Llm(name="x", model="m", url="", api_key="sk-quoted"))
        with pytest.raises(sa.exc.IntegrityError) as taken:
            db.session.flush()
        db.session.rollback()
    line = database.describe(taken.value)
    assert "IntegrityError" in line and "INSERT INTO llm" in line
    assert "sk-quoted" not in line
    assert database.is_unique_violation(taken.value)


