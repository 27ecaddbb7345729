"""One lock order (agents, then LLMs, then the publisher session) for
heartbeat, register, disconnect and gc-sweep, and a sweep that never waits
for another transaction's rows: run all of them at once on the same rows and
nothing deadlocks. One gc-sweep at a time: cron on several hosts at once is
safe, and the second sweep does nothing."""
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from extensions import db
from models import Llm, utcnow
from services import database, gc, lifecycle
from tests.support.database import other_connection, other_engine, pg_only

SESSIONS = 3
ROWS_PER_SESSION = 4
ROUNDS = 60


def specs(session_index):
    llms = [{"name": f"s{session_index}-llm{i}", "model": "m"} for i in range(ROWS_PER_SESSION)]
    agents = [{"name": f"s{session_index}-agent{i}", "llm": f"s{session_index}-llm{i}"}
              for i in range(ROWS_PER_SESSION)]
    return llms, agents


def in_transaction(app, operation):
    with app.app_context():
        try:
            result = operation(db.session)
            db.session.commit()
            return result
        except BaseException:
            db.session.rollback()
            raise


@pg_only("row locks and deadlock detection are PostgreSQL's")
@pytest.mark.parametrize("app_config", [{"DATABASE_LOCK_TIMEOUT": 10}])
def test_heartbeats_registers_disconnects_and_sweeps_at_once_never_deadlock(
        app, publisher):
    for index in range(SESSIONS):
        llms, agents = specs(index)
        in_transaction(app, lambda s: lifecycle.register(
            s, publisher, f"session-{index}", llms, agents, utcnow()))
    errors = []
    deadline = time.monotonic() + 60

    def heartbeat(session, index):
        lifecycle.heartbeat(session, publisher, f"session-{index}", utcnow())

    def register(session, index):
        llms, agents = specs(index)
        lifecycle.register(session, publisher, f"session-{index}", llms, agents, utcnow())

    def disconnect(session, index):
        lifecycle.disconnect(session, publisher, f"session-{index}", utcnow())

    def sweep(session, _index):
        # Everything looks stale to it; nothing is old enough to delete.
        gc.sweep(session, utcnow() + timedelta(hours=1), heartbeat_timeout=0,
                 retention=10**9)

    def loop(operation, offset):
        for round_ in range(ROUNDS):
            if time.monotonic() > deadline:
                return
            try:
                in_transaction(app, lambda s: operation(s, (round_ + offset) % SESSIONS))
            except Exception as exc:  # noqa: BLE001  (collected, then asserted empty)
                errors.append(f"{operation.__name__}: {database.sqlstate(exc)} "
                              f"{type(exc).__name__}")

    threads = [threading.Thread(target=loop, args=(operation, offset))
               for offset, operation in enumerate(
                   (heartbeat, register, disconnect, sweep, heartbeat, sweep))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert errors == []


# -- one sweep at a time --------------------------------------------------------------

def add_stale_llms(app, count):
    now = utcnow()
    with app.app_context():
        db.session.execute(sa.insert(Llm), [
            {"name": f"stale-{i}", "model": "m", "url": "", "kind": "virtual",
             "provider_session_id": "gone", "status": "active",
             "last_heartbeat_at": now - timedelta(hours=1)} for i in range(count)])
        db.session.commit()


@pg_only("the advisory lock is PostgreSQL's")
def test_a_sweep_while_another_sweep_runs_does_nothing_and_says_so(app, runner):
    add_stale_llms(app, 3)
    engine = other_engine(app)  # another host's sweep, its transaction still open
    try:
        with Session(engine) as other:
            first = gc.sweep(other, utcnow(), heartbeat_timeout=90, retention=14400)
            result = runner.invoke(args=["gc-sweep"])
            second = runner.invoke(args=["gc-sweep", "--json"])
            other.commit()
    finally:
        engine.dispose()
    assert first["marked_inactive"] == 3
    assert result.exit_code == 0 and second.exit_code == 0
    assert result.output == "another gc-sweep is running: nothing done\n"
    assert '"skipped":true' in second.output and '"marked_inactive":0' in second.output


@pg_only("row locks are PostgreSQL's")
def test_a_sweep_passes_over_a_row_another_transaction_holds_without_waiting(app):
    add_stale_llms(app, 3)
    engine = other_engine(app)
    try:
        with engine.begin() as holder:  # a heartbeat, say, in the middle of its transaction
            holder.execute(sa.text("SELECT id FROM llm WHERE name = 'stale-0' FOR UPDATE"))
            started = time.monotonic()
            with app.app_context():
                result = gc.sweep(db.session, utcnow(), heartbeat_timeout=90, retention=14400)
                db.session.commit()
            assert time.monotonic() - started < 1.5  # it did not wait for the row
    finally:
        engine.dispose()
    assert result["llms"]["marked_inactive"] == 2
    with app.app_context():  # the next sweep takes it
        again = gc.sweep(db.session, utcnow(), heartbeat_timeout=90, retention=14400)
        db.session.commit()
    assert again["llms"]["marked_inactive"] == 1


def test_two_sweeps_at_once_do_the_work_once_without_error(app):
    add_stale_llms(app, 200)
    barrier = threading.Barrier(2, timeout=10)
    results, errors = [], []

    def sweep():
        try:
            barrier.wait()
            results.append(in_transaction(app, lambda s: gc.sweep(
                s, utcnow(), heartbeat_timeout=90, retention=14400)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(r["marked_inactive"] for r in results) == [0, 200]
    with other_connection(app) as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM llm WHERE status = 'inactive'")) == 200

