"""Fixtures: a fresh app on a real database of its own per test.

The stack (SQLite + memory bus, or PostgreSQL + Redis) comes from the
environment: see tests/support/stack.py. The schema is built once per run by
the real migrations (`flask db upgrade`) into a template database, which each
test copies.
"""
import flask_migrate
import pytest
import responses
import sqlalchemy as sa

from app import create_app
from extensions import db
from models import ApiToken
from services import tokens as token_service
from tests.support import stack

ROLES = ("admin", "publisher", "client")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """The URL of a migrated database that tests copy (never connected to meanwhile)."""
    url = stack.empty_database(tmp_path_factory.mktemp("template"))
    app = create_app({"SQLALCHEMY_DATABASE_URI": stack.sqlalchemy_url(url)})
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    yield url
    stack.drop_run_databases()


@pytest.fixture
def app_config():
    """Override in a test module to change settings."""
    return {}


@pytest.fixture
def app(tmp_path, template_db, app_config):
    url = stack.copy_database(template_db, tmp_path)
    bus_settings = stack.bus_settings()
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": stack.sqlalchemy_url(url),
                      **bus_settings, **app_config})
    yield app
    app.extensions["instrumentation"].close()
    app.extensions["task_bus"].close()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    stack.drop_database(url)
    if "REDIS_PREFIX" in bus_settings:
        prefix = bus_settings["REDIS_PREFIX"]
        left = stack.keys_without_ttl(prefix)
        stack.delete_redis_keys(prefix)
        assert not left, f"Redis keys without a TTL: {left}"


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
def ctx(app):
    """The app, with an app context pushed for the test (service-level tests)."""
    with app.app_context():
        yield app


@pytest.fixture
def publisher(ctx, tokens):
    """The publisher token as the services see a caller."""
    row = db.session.scalar(sa.select(ApiToken).where(ApiToken.role == "publisher"))
    return token_service.Caller(id=row.id, name=row.name, role=row.role)


@pytest.fixture
def auth(tokens):
    """auth('client') → the Authorization header for that role's token."""
    return lambda role: {"Authorization": f"Bearer {tokens[role]}"}


@pytest.fixture
def upstream():
    """The HTTP of upstream LLMs, faked with `responses`: every reply a test
    registers must be asked for (some modules have an `upstream` of their own)."""
    with responses.RequestsMock() as mock:
        yield mock


# -- live servers (gunicorn + gevent on a free loopback port) -----------------

def _live_server_factory(tmp_path):
    from tests.support.live import start_server

    started = []

    def start(env=None, share_with=None):
        server = start_server(tmp_path, env, share_with=share_with)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
        left = {}
        for server in started:
            left.update(server.clean_up())
        assert not left, f"Redis keys without a TTL: {sorted(left)}"


@pytest.fixture
def live_server_factory(tmp_path):
    """start(env=None, share_with=None) → a LiveServer with these extra
    environment settings (with `share_with`: a second host of that server);
    every server started is stopped at teardown."""
    yield from _live_server_factory(tmp_path)


@pytest.fixture
def live_server(live_server_factory):
    """A LiveServer with default settings, for this test alone."""
    return live_server_factory()


@pytest.fixture(scope="module")
def module_live_server_factory(tmp_path_factory):
    """Like live_server_factory, shared by a module's tests."""
    yield from _live_server_factory(tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="module")
def module_live_server(module_live_server_factory):
    """One LiveServer with default settings for the whole module: tests sharing
    it must not depend on each other's rows (use distinct names)."""
    return module_live_server_factory()


@pytest.fixture
def fake_openai():
    """A FakeOpenAI upstream for this test."""
    from tests.support.fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_fake_openai():
    """One FakeOpenAI for the module; `reset()` between tests is the test's job."""
    from tests.support.fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        yield fake
