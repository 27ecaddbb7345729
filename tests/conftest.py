"""Fixtures: a fresh app on its own real SQLite file per test.

The schema is built once per run by the real migrations (`flask db upgrade`)
into a template file, which each test copies.
"""
import shutil

import flask_migrate
import pytest

from app import create_app
from extensions import db
from services import tokens as token_service

ROLES = ("admin", "publisher", "client")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "switchboard.db"
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"})
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    return path


@pytest.fixture
def app_config():
    """Override in a test module to change settings."""
    return {}


@pytest.fixture
def app(tmp_path, template_db, app_config):
    path = tmp_path / "switchboard.db"
    shutil.copy(template_db, path)
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
                      **app_config})
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def tokens(app):
    """A raw token per role: {'admin': 'sb_...', 'publisher': ..., 'client': ...}."""
    with app.app_context():
        raw = {role: token_service.create_token(db.session, f"{role}-token", role)
               for role in ROLES}
        db.session.commit()
    return raw


@pytest.fixture
def auth(tokens):
    """auth('client') → the Authorization header for that role's token."""
    return lambda role: {"Authorization": f"Bearer {tokens[role]}"}
