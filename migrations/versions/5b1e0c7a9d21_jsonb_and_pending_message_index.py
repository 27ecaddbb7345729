"""JSON columns as JSONB on PostgreSQL; chat_message indexed by status and created_at

Revision ID: 5b1e0c7a9d21
Revises: 3f6c2b9d1e47
Create Date: 2026-12-01 12:00:00.000000

On SQLite the JSON columns stay as they are (JSON is text there): only the
index is new. On PostgreSQL each JSON column is rewritten as JSONB, which
cannot hold the escape \\u0000 that the old json type accepted: rows holding
one have it replaced by U+FFFD first, so the conversion cannot fail on old
data. The rewrite takes each table's exclusive lock for as long as it runs
(`flask db upgrade` has its own, longer bounds: MAINTENANCE_*_TIMEOUT).
"""
import json

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


# revision identifiers, used by Alembic.
revision = '5b1e0c7a9d21'
down_revision = '3f6c2b9d1e47'
branch_labels = None
depends_on = None

JSON_COLUMNS = (
    ('llm', 'extra_config', False),
    ('agent', 'default_params', False),
    ('agent', 'extras', False),
    ('chat_message', 'tool_calls', True),
)


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        for table, column, nullable in JSON_COLUMNS:
            _replace_nul_escapes(bind, table, column)
            op.alter_column(table, column, type_=postgresql.JSONB(),
                            existing_type=sa.JSON(), existing_nullable=nullable,
                            postgresql_using=f'{column}::jsonb')
    op.create_index('ix_chat_message_status_created_at', 'chat_message',
                    ['status', 'created_at'], unique=False)


def downgrade():
    op.drop_index('ix_chat_message_status_created_at', table_name='chat_message')
    if op.get_bind().dialect.name == 'postgresql':
        for table, column, nullable in JSON_COLUMNS:
            op.alter_column(table, column, type_=sa.JSON(),
                            existing_type=postgresql.JSONB(), existing_nullable=nullable,
                            postgresql_using=f'{column}::json')


def _replace_nul_escapes(bind, table, column):
    """Rewrite the (few) values whose JSON text holds \\u0000 without it."""
    suspects = bind.execute(sa.text(
        f"SELECT id, {column}::text FROM {table} WHERE strpos({column}::text, '\\u0000') > 0"))
    for row_id, text in suspects.all():
        value = _without_nul(json.loads(text))
        bind.execute(sa.text(f"UPDATE {table} SET {column} = CAST(:value AS json) "
                             f"WHERE id = :id"), {"value": json.dumps(value), "id": row_id})


def _without_nul(value):
    if isinstance(value, str):
        return value.replace('\x00', '\ufffd')
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value
