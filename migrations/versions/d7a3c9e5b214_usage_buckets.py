"""Usage per token and LLM in time buckets (GET /api/v1/usage)

Revision ID: d7a3c9e5b214
Revises: c9a4e2b7d815
Create Date: 2026-12-02 01:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'd7a3c9e5b214'
down_revision = 'c9a4e2b7d815'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'usage_bucket',
        sa.Column('bucket_start', sa.DateTime(), nullable=False),
        sa.Column('token_id', sa.String(length=32), nullable=False),
        sa.Column('llm', sa.String(length=200), nullable=False),
        sa.Column('requests', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
        sa.Column('estimated', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['token_id'], ['api_token.id'],
                                name=op.f('fk_usage_bucket_token_id_api_token'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('bucket_start', 'token_id', 'llm', name=op.f('pk_usage_bucket')),
    )


def downgrade():
    op.drop_table('usage_bucket')
