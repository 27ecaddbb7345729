"""LLMs declare a capacity (max_concurrency); an agent runs on an LLM or on a pool (model)

Revision ID: b4e8d2f1a630
Revises: 7c2d4e6f8a10
Create Date: 2026-12-01 23:30:00.000000

`agent.llm_id` becomes nullable: an agent has either an LLM or a model (a
pool), which a check constraint keeps true. Downgrade refuses while an agent
runs on a pool (it has no LLM to go back to).
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b4e8d2f1a630'
down_revision = '7c2d4e6f8a10'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('llm', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_concurrency', sa.Integer(), nullable=True))
    with op.batch_alter_table('agent', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model', sa.String(length=200), nullable=True))
        batch_op.alter_column('llm_id', existing_type=sa.String(length=32), nullable=True)
        batch_op.create_check_constraint('llm_or_model', '(llm_id IS NULL) <> (model IS NULL)')


def downgrade():
    pooled = op.get_bind().execute(sa.text(
        "SELECT name FROM agent WHERE llm_id IS NULL")).scalars().all()
    if pooled:
        raise RuntimeError(f"agents run on pools: {', '.join(pooled)}; give each an LLM "
                           "first (PATCH /api/v1/agents/<name> with an llm)")
    with op.batch_alter_table('agent', schema=None) as batch_op:
        batch_op.drop_constraint('llm_or_model', type_='check')
        batch_op.alter_column('llm_id', existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column('model')
    with op.batch_alter_table('llm', schema=None) as batch_op:
        batch_op.drop_column('max_concurrency')
