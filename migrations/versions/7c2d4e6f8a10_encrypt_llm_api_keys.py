"""Encrypt the API keys of LLMs at rest (Fernet, SWITCHBOARD_SECRET_KEY)

Revision ID: 7c2d4e6f8a10
Revises: 5b1e0c7a9d21
Create Date: 2026-12-01 21:00:00.000000

The key is the running configuration's (settings.py: SWITCHBOARD_SECRET_KEY,
else instance/SWITCHBOARD_SECRET_KEY), so `flask db upgrade` and the server
must see the same one. Upgrade encrypts every plaintext key and leaves keys
that already decrypt alone; downgrade decrypts them, and stops, changing
nothing, at a key this key does not decrypt.
"""
from alembic import op
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from flask import current_app


# revision identifiers, used by Alembic.
revision = '7c2d4e6f8a10'
down_revision = '5b1e0c7a9d21'
branch_labels = None
depends_on = None

llm = sa.table("llm", sa.column("id", sa.String), sa.column("name", sa.String),
               sa.column("api_key", sa.Text))


def _fernet():
    return Fernet(current_app.config["API_KEY_SECRET"].strip().encode())


def _stored_keys(connection):
    return connection.execute(sa.select(llm.c.id, llm.c.name, llm.c.api_key)
                              .where(llm.c.api_key.is_not(None))).all()


def _decrypted(fernet, value):
    try:
        return fernet.decrypt(value.encode()).decode()
    except InvalidToken:
        return None


def upgrade():
    connection, fernet = op.get_bind(), _fernet()
    for id_, _name, api_key in _stored_keys(connection):
        if _decrypted(fernet, api_key) is not None:
            continue  # already encrypted (an upgrade run again after a partial downgrade)
        value = fernet.encrypt(api_key.encode()).decode() if api_key else None
        connection.execute(llm.update().where(llm.c.id == id_).values(api_key=value))


def downgrade():
    connection, fernet = op.get_bind(), _fernet()
    plain = {}
    for id_, name, api_key in _stored_keys(connection):
        value = _decrypted(fernet, api_key)
        if value is None:
            raise RuntimeError(f"The API key of LLM '{name}' does not decrypt with this "
                               f"SWITCHBOARD_SECRET_KEY; set the key it was encrypted with")
        plain[id_] = value
    for id_, value in plain.items():
        connection.execute(llm.update().where(llm.c.id == id_).values(api_key=value))
