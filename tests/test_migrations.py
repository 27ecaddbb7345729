"""The migrations build the schema the models describe."""
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from extensions import db
from tests.support.live import REPO_ROOT, free_port, run_flask, server_env


def migrated_engine(tmp_path, *commands):
    """A fresh SQLite file after `flask db <command>` for each command, run as
    the operator runs them (a subprocess)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = server_env(url, free_port())
    results = [run_flask(env, "db", *command.split()) for command in commands]
    return sa.create_engine(url), results


def head_revision():
    return ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head()


def test_upgrade_on_an_empty_database_builds_every_table(tmp_path):
    engine, _ = migrated_engine(tmp_path, "upgrade")
    tables = set(sa.inspect(engine).get_table_names())
    assert tables == set(db.metadata.tables) | {"alembic_version"}
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == head_revision()


def test_the_migrated_schema_matches_the_models(tmp_path):
    engine, _ = migrated_engine(tmp_path, "upgrade")
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        assert compare_metadata(context, db.metadata) == []


def test_the_llm_table_has_its_lifecycle_indexes(tmp_path):
    engine, _ = migrated_engine(tmp_path, "upgrade")
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(engine).get_indexes("llm")}
    assert indexes["ix_llm_kind_status"] == ["kind", "status"]
    assert indexes["ix_llm_provider_session_id"] == ["provider_session_id"]


def test_downgrade_to_base_drops_everything_and_upgrade_rebuilds(tmp_path):
    engine, _ = migrated_engine(tmp_path, "upgrade", "downgrade base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    engine, _ = migrated_engine(tmp_path, "upgrade")
    assert set(sa.inspect(engine).get_table_names()) >= set(db.metadata.tables)


def test_upgrade_twice_is_a_no_op(tmp_path):
    _, results = migrated_engine(tmp_path, "upgrade", "upgrade")
    assert "Running upgrade" in results[0].stderr
    assert "Running upgrade" not in results[1].stderr


def test_tokens_create_in_a_real_process_prints_only_the_token(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = server_env(url, free_port())
    run_flask(env, "db", "upgrade")
    result = run_flask(env, "tokens", "create", "ci", "--role", "client")
    assert result.stdout.startswith("sb_")
    assert result.stdout.count("\n") == 1
