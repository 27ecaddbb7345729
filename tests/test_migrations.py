"""The migrations build the schema the models describe."""
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from extensions import db
from tests.support.live import REPO_ROOT, free_port, run_flask, server_env


def migrate(tmp_path, *commands):
    """(engine, results) for a fresh SQLite file after `flask db <command>` for
    each command, run as the operator runs them (a subprocess)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = server_env(url, free_port())
    results = [run_flask(env, "db", *command.split()) for command in commands]
    return sa.create_engine(url), env, results


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """One empty file after `flask db upgrade`, shared by the module's read-only tests."""
    engine, env, (result,) = migrate(tmp_path_factory.mktemp("migrated"), "upgrade")
    yield engine, env, result
    engine.dispose()


def head_revision():
    return ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head()


def test_upgrade_on_an_empty_database_builds_every_table(migrated):
    engine, _, result = migrated
    assert "Running upgrade" in result.stderr
    tables = set(sa.inspect(engine).get_table_names())
    assert tables == set(db.metadata.tables) | {"alembic_version"}
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == head_revision()


def test_the_migrated_schema_matches_the_models(migrated):
    engine, _, _ = migrated
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        assert compare_metadata(context, db.metadata) == []


def test_the_llm_table_has_its_lifecycle_indexes(migrated):
    engine, _, _ = migrated
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(engine).get_indexes("llm")}
    assert indexes["ix_llm_kind_status"] == ["kind", "status"]
    assert indexes["ix_llm_provider_session_id"] == ["provider_session_id"]


def test_a_second_upgrade_is_a_no_op(migrated):
    _, env, _ = migrated
    assert "Running upgrade" not in run_flask(env, "db", "upgrade").stderr


def test_tokens_create_in_a_real_process_prints_only_the_token(migrated):
    _, env, _ = migrated
    result = run_flask(env, "tokens", "create", "ci", "--role", "client")
    assert result.stdout.startswith("sb_")
    assert result.stdout.count("\n") == 1


def test_downgrade_to_base_drops_everything_and_upgrade_rebuilds(tmp_path):
    engine, _, _ = migrate(tmp_path, "upgrade", "downgrade base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    engine, _, _ = migrate(tmp_path, "upgrade")
    assert set(sa.inspect(engine).get_table_names()) >= set(db.metadata.tables)
    engine.dispose()
