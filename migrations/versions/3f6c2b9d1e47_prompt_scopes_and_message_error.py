"""Prompt names unique per scope; chat_message.error

Revision ID: 3f6c2b9d1e47
Revises: 0a0736b4842a
Create Date: 2026-11-26 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '3f6c2b9d1e47'
down_revision = '0a0736b4842a'
branch_labels = None
depends_on = None

GLOBAL = "project_id IS NULL AND agent_id IS NULL"


def upgrade():
    with op.batch_alter_table('chat_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))

    # Plain ALTER / CREATE INDEX: no batch table copy, whose DROP TABLE would
    # cascade into personality_prompt under `PRAGMA foreign_keys=ON`.
    with op.batch_alter_table('prompt', schema=None) as batch_op:
        # NULLs are distinct in a unique index, hence one partial index per scope.
        batch_op.create_index('uq_prompt_global_name', ['name'], unique=True,
                              sqlite_where=sa.text(GLOBAL), postgresql_where=sa.text(GLOBAL))
        batch_op.create_index('uq_prompt_project_id_name', ['project_id', 'name'], unique=True,
                              sqlite_where=sa.text('project_id IS NOT NULL'),
                              postgresql_where=sa.text('project_id IS NOT NULL'))
        batch_op.create_index('uq_prompt_agent_id_name', ['agent_id', 'name'], unique=True,
                              sqlite_where=sa.text('agent_id IS NOT NULL'),
                              postgresql_where=sa.text('agent_id IS NOT NULL'))


def downgrade():
    with op.batch_alter_table('prompt', schema=None) as batch_op:
        batch_op.drop_index('uq_prompt_agent_id_name')
        batch_op.drop_index('uq_prompt_project_id_name')
        batch_op.drop_index('uq_prompt_global_name')

    with op.batch_alter_table('chat_message', schema=None) as batch_op:
        batch_op.drop_column('error')
