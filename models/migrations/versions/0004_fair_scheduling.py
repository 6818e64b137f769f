"""fair scheduling: index of each account's live jobs; merges the 0002/0003 branches

Revision ID: 0004_fair_scheduling
Revises: 0002_drafting, 0003_operations
Create Date: 2026-11-25 19:10:00

tasks.enqueue.fair_priority counts an account's queued/retrying/running jobs at every
enqueue; the partial index keeps that count off the finished rows, however many there are.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_fair_scheduling'
down_revision = ('0002_drafting', '0003_operations')
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_writeback_jobs_account_live', 'writeback_jobs', ['account_id'], unique=False,
                    postgresql_where=sa.text("state IN ('queued', 'retrying', 'running')"))


def downgrade() -> None:
    op.drop_index('ix_writeback_jobs_account_live', table_name='writeback_jobs',
                  postgresql_where=sa.text("state IN ('queued', 'retrying', 'running')"))
