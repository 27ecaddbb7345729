"""Check-then-insert races between real concurrent transactions end in a 409
(the CLI: a one-line error), never a 500. Each race is lined up on purpose:
both transactions have done their checks before either writes (a barrier
right before the INSERT), so every repetition hits it.

On PostgreSQL the loser's INSERT waits for the winner's commit and then
violates the unique index; on SQLite the single writer serializes them and
the loser finds the winner's row. Either way: one row, one 201, one 409."""
import subprocess
import threading

import sqlalchemy as sa

from extensions import db
from models import Agent, ApiToken, Llm, PublisherSession
from services import tokens as token_service
from services.errors import Conflict
from tests.support import stack
from tests.support.database import (backends_waiting_for_a_lock, barrier_before,
                                    other_connection, pg_only, wait_until)
from tests.support.live import REPO_ROOT, server_env, venv_bin

REPEATS = 5


def engine_of(app):
    with app.app_context():
        return db.engine


def at_once(*calls):
    """Run each call in a thread of its own; their results, in order."""
    results = [None] * len(calls)

    def run(index, call):
        try:
            results[index] = call()
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion)
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def racing_statement(prefix):
    """Where the two transactions are held: right before the racing INSERT on
    PostgreSQL; on SQLite before the first INSERT (a transaction that wrote
    keeps the database's write lock, so it cannot wait for the other)."""
    return prefix if stack.DB == "postgres" else "INSERT"


def register(client, auth, session_id, name):
    return client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
        "session_id": session_id, "llms": [{"name": name, "model": "m"}]})


def outcome(response):
    if isinstance(response, BaseException):
        return repr(response)
    return response.status_code


def count(app, model, condition):
    with other_connection(app) as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(model).where(condition))


def test_two_publishers_registering_one_new_name_at_once_get_a_201_and_a_409(
        app, auth):
    engine = engine_of(app)
    for attempt in range(REPEATS):
        name = f"race-{attempt}"
        with barrier_before(engine, racing_statement("INSERT INTO llm")):
            responses = at_once(
                lambda: register(app.test_client(), auth, f"a-{attempt}", name),
                lambda: register(app.test_client(), auth, f"b-{attempt}", name))
        assert sorted(map(outcome, responses)) == [201, 409], [
            r.get_data(as_text=True) for r in responses if hasattr(r, "get_data")]
        loser = next(r for r in responses if r.status_code == 409)
        assert loser.json["error"]["code"] in ("registration_conflict", "session_conflict")
        assert count(app, Llm, Llm.name == name) == 1


def test_two_registers_of_one_new_sticky_session_get_a_201_and_a_409(app, auth):
    engine = engine_of(app)
    for attempt in range(REPEATS):
        session_id = f"sticky-{attempt}"
        with barrier_before(engine, racing_statement("INSERT INTO publisher_session")):
            responses = at_once(
                lambda: register(app.test_client(), auth, session_id, f"own-{attempt}"),
                lambda: register(app.test_client(), auth, session_id, f"own-{attempt}"))
        assert sorted(map(outcome, responses)) == [201, 409]
        loser = next(r for r in responses if r.status_code == 409)
        assert loser.json["error"]["code"] == "registration_conflict"
        assert count(app, PublisherSession, PublisherSession.id == session_id) == 1
        assert count(app, Llm, Llm.name == f"own-{attempt}") == 1


def test_two_token_creates_of_one_name_at_once_make_one_token_and_a_conflict(app):
    engine = engine_of(app)

    def create(name):
        with app.app_context():
            raw = token_service.create_token(db.session, name, "client")
            db.session.commit()
            return raw

    for attempt in range(REPEATS):
        name = f"ci-{attempt}"
        with barrier_before(engine, "INSERT INTO api_token"):
            results = at_once(lambda: create(name), lambda: create(name))
        conflicts = [r for r in results if isinstance(r, Conflict)]
        made = [r for r in results if isinstance(r, str)]
        assert (len(made), len(conflicts)) == (1, 1), results
        assert conflicts[0].status == 409 and "taken" in conflicts[0].message
        assert count(app, ApiToken, ApiToken.name == name) == 1


@pg_only("two processes lined up on a PostgreSQL table lock")
def test_two_flask_tokens_create_at_once_one_prints_a_token_and_one_a_one_line_error(app):
    env = server_env(app.config["SQLALCHEMY_DATABASE_URI"], 0,
                     {"SWITCHBOARD_DATABASE_LOCK_TIMEOUT": 30})
    # Both commands read that the name is free, then wait to insert: this
    # connection holds the table against writes (reads go on).
    with other_connection(app) as holder:
        holder.execute(sa.text("LOCK TABLE api_token IN SHARE ROW EXCLUSIVE MODE"))
        commands = [subprocess.Popen([str(venv_bin() / "flask"), "tokens", "create", "ci",
                                      "--role", "client"], cwd=REPO_ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for _ in range(2)]
        try:
            wait_until(lambda: backends_waiting_for_a_lock(app) == 2, timeout=30)
        except AssertionError:
            for command in commands:
                command.kill()
            raise
    outputs = [command.communicate(timeout=30) for command in commands]
    codes = sorted((command.returncode, out, err) for command, (out, err)
                   in zip(commands, outputs))
    (ok, token, _), (failed, nothing, error) = codes
    assert (ok, failed) == (0, 1)
    assert token.startswith("sb_") and token.count("\n") == 1
    assert nothing == ""
    assert error == "Error: Token name 'ci' is taken\n"
    assert count(app, ApiToken, ApiToken.name == "ci") == 1


def test_two_publishers_registering_one_new_agent_name_at_once_get_a_201_and_a_409(
        app, auth):
    engine = engine_of(app)

    def publish(session_id, llm, agent):
        return app.test_client().post(
            "/api/v1/publishers/register", headers=auth("publisher"),
            json={"session_id": session_id, "llms": [{"name": llm, "model": "m"}],
                  "agents": [{"name": agent, "llm": llm}]})

    for attempt in range(REPEATS):
        agent = f"shared-agent-{attempt}"
        with barrier_before(engine, racing_statement("INSERT INTO agent")):
            responses = at_once(lambda: publish(f"x-{attempt}", f"x-llm-{attempt}", agent),
                                lambda: publish(f"y-{attempt}", f"y-llm-{attempt}", agent))
        assert sorted(map(outcome, responses)) == [201, 409]
        assert count(app, Agent, Agent.name == agent) == 1
