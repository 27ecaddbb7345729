"""The application factory: config → extensions → blueprints → errors → CLI."""
import logging
import os

import sqlalchemy as sa
from flask import Blueprint, Flask

import settings
from extensions import cors, db, migrate
from jsonio import OrjsonProvider

log = logging.getLogger(__name__)


def create_app(config=None, instance_path=None):
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True,
                static_folder=None)
    # `%2F` in a path is decoded to `/`: never merge the slashes that makes into
    # a redirect (308, method and body kept) to another resource; it is a 404.
    app.url_map.merge_slashes = False
    app.json = OrjsonProvider(app)
    settings.load(app, config)
    register_extensions(app)
    register_instrumentation(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    check_stored_secrets(app)
    return app


def register_extensions(app):
    import models  # noqa: F401  (registers the tables with db)
    from services import database, recent_errors
    from services.api_keys import ApiKeyCipher
    from services.bus import create_bus
    from services.cache import TtlMap
    from services.routes import RouteCache
    from services.schema import SchemaCheck

    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    _create_private_sqlite_file(uri)
    options = app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    for key, value in database.engine_options(uri, app.config).items():
        options.setdefault(key, value)
    db.init_app(app)
    migrate.init_app(app, db, render_as_batch=True)
    with app.app_context():
        database.check_before_use(db.engine)
        if uri.startswith("sqlite"):
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
    register_cors(app)
    app.extensions["schema_check"] = SchemaCheck(os.path.join(app.root_path, "migrations"))
    app.extensions["api_key_cipher"] = ApiKeyCipher.from_config(app.config)
    ttl = float(app.config["AUTH_CACHE_TTL"])
    app.extensions["token_cache"] = TtlMap(ttl)          # token hash -> Caller
    app.extensions["session_owner_cache"] = TtlMap(ttl)  # session id -> owner token id
    app.extensions["task_bus"] = create_bus(app.config)
    app.extensions["routes"] = RouteCache(app.extensions["task_bus"])  # public LLMs' rows
    app.extensions["recent_errors"] = recent_errors.for_bus(app.extensions["task_bus"])


def register_instrumentation(app):
    """Request ids, the access line, metrics and usage (SWITCHBOARD_INSTRUMENT)."""
    from blueprints.instrumentation import Instrumentation

    Instrumentation(app)


def register_cors(app):
    """Browsers may call /v1 and /api/v1 from SWITCHBOARD_CORS_ORIGINS only
    (none by default); blueprints/common.refuse_foreign_preflight turns the
    others' preflights away."""
    origins = settings.cors_origins(app.config)
    if origins:
        cors.init_app(app, resources=[r"/v1/*", r"/api/v1/*"], origins=origins,
                      allow_headers=["Authorization", "Content-Type"],
                      methods=["GET", "POST", "PATCH", "DELETE"],
                      expose_headers=["Retry-After", "X-Request-Id"], max_age=600)


def _create_private_sqlite_file(uri):
    """SQLite would create the file with the umask's mode (often world-readable);
    create it empty, 0600, first. Its -wal and -shm files take the same mode."""
    url = sa.engine.make_url(uri)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    try:
        os.close(os.open(url.database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError:  # no such folder, say: SQLite says so itself on connecting
        pass


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def register_blueprints(app):
    from blueprints import (agents, chat, common, health, infer, llms, openai_compat, openapi,
                            operations, projects, prompts, publishers, status)

    app.before_request(common.refuse_nul_in_url)
    app.before_request(common.require_migrated_schema)
    app.before_request(common.refuse_foreign_preflight)
    api = Blueprint("api", __name__, url_prefix="/api/v1")
    api.before_request(common.authenticate_request)
    for child in (llms.bp, infer.bp, publishers.bp, agents.bp, projects.bp, prompts.bp,
                  chat.bp, operations.bp):
        api.register_blueprint(child)
    app.register_blueprint(api)
    app.register_blueprint(openai_compat.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(operations.metrics_bp)
    app.register_blueprint(status.bp)
    app.session_interface = status.StatusSessions()
    app.after_request(status.record_error_answer)
    app.before_request(common.authenticate_unmatched)


def register_errorhandlers(app):
    from blueprints.errors import register_errorhandlers as register

    register(app)


def register_commands(app):
    import cli

    cli.init_app(app)


def check_stored_secrets(app):
    """Start-up: refuse to run with a SWITCHBOARD_SECRET_KEY that does not
    decrypt the stored API keys (a changed key, another host's generated one)
    rather than fail, or send garbage upstream, at the first request. Skipped
    while the schema is not current (`flask db upgrade` must still run) or the
    database cannot be reached (requests then answer 503)."""
    from services.api_keys import check_stored_keys

    from_files = app.config["SECRETS_FROM_INSTANCE"]
    if from_files:  # louder when scaled out: likely several hosts
        names = " and ".join(from_files)
        log.log(logging.WARNING if app.config.get("REDIS_URL") else logging.INFO,
                "%s read from %s: with several hosts, set %s in the environment instead, "
                "the same on every host", names, app.instance_path, names)
    with app.app_context():
        try:
            with db.engine.connect() as connection:
                if app.extensions["schema_check"].problem(connection) is not None:
                    return
            check_stored_keys(db.session, app.extensions["api_key_cipher"])
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not check the stored API keys at start-up (%s)",
                        type(exc).__name__)
        finally:
            db.session.remove()
