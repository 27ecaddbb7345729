"""A database `flask db upgrade` has not built (or is behind) answers 503
saying to run it, instead of a bare 500 from a missing table; the health
check stays open; the CLI says the same."""
import flask_migrate
import pytest

from app import create_app
from extensions import db
from tests.support import stack

NOT_MIGRATED = "The database has no schema yet; run `flask db upgrade`"


@pytest.fixture
def fresh_app(tmp_path):
    """An app on a new, empty database of the test stack."""
    url = stack.empty_database(tmp_path)
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": stack.sqlalchemy_url(url)})
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    stack.drop_database(url)


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json["error"]


@pytest.mark.parametrize("path", ["/api/v1/llms", "/v1/models", "/api/v1/nowhere"])
def test_requests_on_a_database_never_migrated_are_503_saying_what_to_run(fresh_app, path):
    response = fresh_app.test_client().get(path, headers={"Authorization": "Bearer sb_x"})
    error = error_of(response, 503)
    assert error["message"] == NOT_MIGRATED
    assert error["code"] == "database_not_migrated"
    assert response.headers["Retry-After"]


def test_healthz_answers_on_a_database_never_migrated(fresh_app):
    assert fresh_app.test_client().get("/healthz").status_code == 200


def test_once_migrated_the_same_server_answers(fresh_app):
    client = fresh_app.test_client()
    assert client.get("/api/v1/llms").status_code == 503
    with fresh_app.app_context():
        flask_migrate.upgrade()
    assert error_of(client.get("/api/v1/llms"), 401)["code"] == "missing_token"


def test_a_database_behind_this_release_is_503_naming_the_revisions(fresh_app):
    with fresh_app.app_context():
        flask_migrate.upgrade(revision="0a0736b4842a")
    error = error_of(fresh_app.test_client().get("/api/v1/llms"), 503)
    assert error["message"].startswith(
        "The database schema is at revision 0a0736b4842a, behind this release's ")
    assert error["message"].endswith("; run `flask db upgrade`")


@pytest.mark.parametrize("command", [["tokens", "list"], ["tokens", "bootstrap"],
                                     ["tokens", "create", "x", "--role", "client"],
                                     ["gc-sweep"]])
def test_the_cli_on_a_database_never_migrated_says_what_to_run(fresh_app, command):
    result = fresh_app.test_cli_runner().invoke(args=command)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: {NOT_MIGRATED}\n"
