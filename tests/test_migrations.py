"""The migrations build the schema the models describe, on the test stack's
engine (SQLite or PostgreSQL), run as the operator runs them (`flask db`
in a subprocess)."""
import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from extensions import db
from models import utcnow
from tests.support import stack
from tests.support.database import pg_only
from tests.support.live import REPO_ROOT, free_port, run_flask, server_env

JSON_COLUMNS = {("llm", "extra_config"), ("llm", "endpoints"), ("agent", "default_params"),
                ("agent", "extras"), ("chat_message", "tool_calls")}
BEFORE_JSONB = "3f6c2b9d1e47"


class Migrated:
    """A new database of the stack's engine and the `flask db` commands run on it."""

    def __init__(self, tmp_path, extra_env=None):
        self.url = stack.empty_database(tmp_path)
        self.env = server_env(self.url, free_port(), extra_env)
        self.engine = sa.create_engine(stack.sqlalchemy_url(self.url))

    def flask_db(self, *commands):
        return [run_flask(self.env, "db", *command.split()) for command in commands]

    def close(self):
        self.engine.dispose()
        stack.drop_database(self.url)


@pytest.fixture
def fresh(tmp_path):
    database = Migrated(tmp_path)
    yield database
    database.close()


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """One empty database after `flask db upgrade`, shared by the module's read-only tests."""
    database = Migrated(tmp_path_factory.mktemp("migrated"))
    (result,) = database.flask_db("upgrade")
    yield database, result
    database.close()


def head_revision():
    return ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head()


def test_upgrade_on_an_empty_database_builds_every_table(migrated):
    database, result = migrated
    assert "Running upgrade" in result.stderr
    tables = set(sa.inspect(database.engine).get_table_names())
    assert tables == set(db.metadata.tables) | {"alembic_version"}
    with database.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == head_revision()


def test_the_migrated_schema_matches_the_models(migrated):
    database, _ = migrated
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        assert compare_metadata(context, db.metadata) == []


def test_the_llm_table_has_its_lifecycle_indexes(migrated):
    database, _ = migrated
    indexes = {ix["name"]: ix["column_names"]
               for ix in sa.inspect(database.engine).get_indexes("llm")}
    assert indexes["ix_llm_kind_status"] == ["kind", "status"]
    assert indexes["ix_llm_provider_session_id"] == ["provider_session_id"]


def test_pending_chat_messages_are_found_by_an_index(migrated):
    database, _ = migrated
    indexes = {ix["name"]: ix["column_names"]
               for ix in sa.inspect(database.engine).get_indexes("chat_message")}
    assert indexes["ix_chat_message_status_created_at"] == ["status", "created_at"]


@pg_only("JSONB is PostgreSQL's")
def test_json_columns_are_jsonb_on_postgresql(migrated):
    database, _ = migrated
    with database.engine.connect() as conn:
        types = set(conn.execute(sa.text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type = 'jsonb'")).all())
    assert types == JSON_COLUMNS


def test_a_second_upgrade_is_a_no_op(migrated):
    database, _ = migrated
    assert "Running upgrade" not in run_flask(database.env, "db", "upgrade").stderr


def test_tokens_create_in_a_real_process_prints_only_the_token(migrated):
    database, _ = migrated
    result = run_flask(database.env, "tokens", "create", f"ci-{uuid.uuid4().hex[:6]}",
                       "--role", "client")
    assert result.stdout.startswith("sb_")
    assert result.stdout.count("\n") == 1


def test_downgrade_to_base_drops_everything_and_upgrade_rebuilds(fresh):
    fresh.flask_db("upgrade", "downgrade base")
    assert set(sa.inspect(fresh.engine).get_table_names()) <= {"alembic_version"}
    fresh.flask_db("upgrade")
    assert set(sa.inspect(fresh.engine).get_table_names()) >= set(db.metadata.tables)


def test_the_jsonb_migration_goes_down_and_up_again(fresh):
    fresh.flask_db("upgrade", f"downgrade {BEFORE_JSONB}", "upgrade")
    with fresh.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, db.metadata) == []


def insert_llm(conn, name, extra_config_json):
    """A row as revision 3f6c2b9d1e47 stores it (extra_config: the json type)."""
    conn.execute(sa.text(
        "INSERT INTO llm (id, name, type, model, url, tier, description, extra_config, "
        "created_at, updated_at, kind, status, version) VALUES "
        "(:id, :name, 'openai', 'm', '', 'fast', '', CAST(:extra AS json), :now, :now, "
        "'public', 'active', 1)"),
        {"id": uuid.uuid4().hex, "name": name, "extra": extra_config_json, "now": utcnow()})


@pg_only("the old json type accepted \\u0000; JSONB does not")
def test_upgrading_keeps_old_json_values_even_those_jsonb_cannot_hold(fresh):
    fresh.flask_db(f"upgrade {BEFORE_JSONB}")
    with fresh.engine.begin() as conn:
        insert_llm(conn, "plain", json.dumps({"a": [1, {"b": "c"}]}))
        insert_llm(conn, "nul", '{"k\\u0000ey": "va\\u0000lue", "kept": "\\\\u0000"}')
    fresh.flask_db("upgrade")
    with fresh.engine.connect() as conn:
        values = dict(conn.execute(sa.text("SELECT name, extra_config FROM llm")).all())
    assert values["plain"] == {"a": [1, {"b": "c"}]}
    assert values["nul"] == {"k\ufffdey": "va\ufffdlue", "kept": "\\u0000"}


@pg_only("PostgreSQL's statement_timeout")
def test_upgrade_on_a_big_table_outlasts_the_servers_statement_timeout(tmp_path):
    database = Migrated(tmp_path, {"SWITCHBOARD_DATABASE_STATEMENT_TIMEOUT": 0.05})
    try:
        database.flask_db(f"upgrade {BEFORE_JSONB}")
        now = utcnow()
        with database.engine.begin() as conn:  # rows the JSONB rewrite has to convert
            conn.execute(sa.text(
                "INSERT INTO llm (id, name, type, model, url, tier, description, "
                "extra_config, created_at, updated_at, kind, status, version) "
                "SELECT md5(i::text), 'row-' || i, 'openai', 'm', '', 'fast', "
                "repeat('x', 200), CAST('{\"a\": [1, 2, 3], \"b\": \"text\"}' AS json), "
                ":now, :now, 'virtual', 'inactive', 1 FROM generate_series(1, 100000) AS i"),
                {"now": now - timedelta(hours=1)})
        with database.engine.connect() as conn:  # the server's bound would stop it
            with pytest.raises(sa.exc.OperationalError):
                conn.execute(sa.text("SET statement_timeout = '50ms'"))
                conn.execute(sa.text(
                    "ALTER TABLE llm ALTER COLUMN extra_config TYPE jsonb "
                    "USING extra_config::jsonb"))
        (result,) = database.flask_db("upgrade")
        assert "Running upgrade 3f6c2b9d1e47 -> 5b1e0c7a9d21" in result.stderr
    finally:
        database.close()


BEFORE_POOLS = "7c2d4e6f8a10"


def test_the_capacity_and_pools_migration_keeps_every_agent_and_what_hangs_on_it(fresh):
    """The agent table is rebuilt on SQLite: its threads and personalities must
    survive (with foreign keys on, dropping the old table would cascade)."""
    fresh.flask_db(f"upgrade {BEFORE_POOLS}")
    now = utcnow()
    with fresh.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO llm (id, name, type, model, url, tier, description, extra_config, "
            "created_at, updated_at, kind, status, version) VALUES (:id, 'box', 'openai', 'm', "
            "'', 'fast', '', '{}', :now, :now, 'public', 'active', 1)"),
            {"id": uuid.uuid4().hex, "now": now})
        llm_id = conn.execute(sa.text("SELECT id FROM llm WHERE name = 'box'")).scalar()
        conn.execute(sa.text(
            "INSERT INTO agent (id, name, description, system_prompt, llm_id, default_params, "
            "extras, kind, status, version, created_at, updated_at) VALUES ('a1', 'helper', '',"
            " '', :llm, '{}', '{}', 'public', 'active', 1, :now, :now)"),
            {"llm": llm_id, "now": now})
        conn.execute(sa.text(
            "INSERT INTO chat_thread (id, agent_id, owner, title, created_at) VALUES "
            "('t1', 'a1', 'someone', 'kept', :now)"), {"now": now})
    fresh.flask_db("upgrade")
    with fresh.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT title FROM chat_thread")).scalars().all() == ["kept"]
        assert conn.execute(sa.text("SELECT model, llm_id FROM agent")).one() == (None, llm_id)
    fresh.flask_db(f"downgrade {BEFORE_POOLS}")  # no agent on a pool: it goes back
    with fresh.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM chat_thread")).scalar() == 1


BEFORE_ENDPOINTS = "b4e8d2f1a630"


def test_rows_from_before_endpoints_serve_chat_completions_and_the_column_goes_down(fresh):
    fresh.flask_db(f"upgrade {BEFORE_ENDPOINTS}")
    with fresh.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO llm (id, name, type, model, url, tier, description, extra_config, "
            "created_at, updated_at, kind, status, version) VALUES (:id, 'old', 'openai', 'm', "
            "'', 'fast', '', '{}', :now, :now, 'public', 'active', 1)"),
            {"id": uuid.uuid4().hex, "now": utcnow()})
    fresh.flask_db("upgrade")
    with fresh.engine.connect() as conn:
        endpoints = conn.execute(sa.text("SELECT endpoints FROM llm")).scalar()
    assert (json.loads(endpoints) if isinstance(endpoints, str) else endpoints) == [
        "chat/completions"]
    fresh.flask_db(f"downgrade {BEFORE_ENDPOINTS}")
    with fresh.engine.connect() as conn:
        assert "endpoints" not in {c["name"] for c in sa.inspect(conn).get_columns("llm")}
        assert conn.execute(sa.text("SELECT name FROM llm")).scalar() == "old"
