"""attempt rows say how much of the attempt was spent waiting on the PSA

Revision ID: 0005_attempt_psa_time
Revises: 0004_fair_scheduling
Create Date: 2026-11-25 21:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_attempt_psa_time'
down_revision = '0004_fair_scheduling'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('writeback_attempts', sa.Column('psa_ms', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('writeback_attempts', 'psa_ms')
