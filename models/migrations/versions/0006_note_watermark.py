"""jobs remember the newest note id on the ticket when their note intent was recorded

Revision ID: 0006_note_watermark
Revises: 0005_attempt_psa_time
Create Date: 2026-11-25 21:40:00

The reconcile after an unanswered POST used to look among the ticket's 50 most recent
notes only; with the watermark it looks at every note newer than the intent (tasks.steps).
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_note_watermark'
down_revision = '0005_attempt_psa_time'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('writeback_jobs', sa.Column('note_watermark_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('writeback_jobs', 'note_watermark_id')
