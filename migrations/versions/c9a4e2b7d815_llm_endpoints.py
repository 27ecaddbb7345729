"""LLMs list the endpoints their backend serves (endpoints)

Revision ID: c9a4e2b7d815
Revises: b4e8d2f1a630
Create Date: 2026-12-02 01:00:00.000000

Every existing row keeps what it served before: chat completions only.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


# revision identifiers, used by Alembic.
revision = 'c9a4e2b7d815'
down_revision = 'b4e8d2f1a630'
branch_labels = None
depends_on = None


def upgrade():
    json = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')
    with op.batch_alter_table('llm', schema=None) as batch_op:
        batch_op.add_column(sa.Column('endpoints', json, nullable=False,
                                      server_default=sa.text("'[\"chat/completions\"]'")))


def downgrade():
    with op.batch_alter_table('llm', schema=None) as batch_op:
        batch_op.drop_column('endpoints')
