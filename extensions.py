"""Extensions, created unbound; `app.create_app` binds them."""
import sqlalchemy as sa
from flask_cors import CORS
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
cors = CORS()


def relay():
    """The app's relay (services/relay.py), made on first use: `flask`
    commands never need one, nor its HTTP stack."""
    from flask import current_app

    extensions = current_app.extensions
    if "relay" not in extensions:
        from services.relay import Relay

        extensions["relay"] = Relay.from_config(current_app.config, extensions["task_bus"])
    return extensions["relay"]
