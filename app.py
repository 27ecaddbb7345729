"""The application factory: config → extensions → blueprints → errors → CLI."""
import logging

import sqlalchemy as sa
from flask import Blueprint, Flask

import settings
from extensions import db, migrate
from jsonio import OrjsonProvider

log = logging.getLogger(__name__)


def create_app(config=None):
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    app.json = OrjsonProvider(app)
    settings.load(app, config)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    return app


def register_extensions(app):
    import models  # noqa: F401  (registers the tables with db)
    from services import database
    from services.bus import create_bus
    from services.relay import Relay

    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    options = app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    for key, value in database.engine_options(uri, app.config).items():
        options.setdefault(key, value)
    db.init_app(app)
    migrate.init_app(app, db, render_as_batch=True)
    if uri.startswith("sqlite"):
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
    bus = app.extensions["task_bus"] = create_bus(app.config)
    app.extensions["relay"] = Relay.from_config(app.config, bus)


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def register_blueprints(app):
    from blueprints import (agents, chat, common, health, infer, llms, openai_compat, projects,
                            prompts, publishers)

    app.before_request(common.refuse_nul_in_url)
    api = Blueprint("api", __name__, url_prefix="/api/v1")
    api.before_request(common.authenticate_request)
    for child in (llms.bp, infer.bp, publishers.bp, agents.bp, projects.bp, prompts.bp,
                  chat.bp):
        api.register_blueprint(child)
    app.register_blueprint(api)
    app.register_blueprint(openai_compat.bp)
    app.register_blueprint(health.bp)
    app.before_request(common.authenticate_unmatched)


def register_errorhandlers(app):
    from blueprints.errors import register_errorhandlers as register

    register(app)


def register_commands(app):
    import cli

    cli.init_app(app)
