"""tenant hardening: keys bound to their connection, idempotency keys per account, drafting defaults

Revision ID: 0007_tenant_hardening
Revises: 0006_note_watermark
Create Date: 2026-12-01 17:40:00

- psa_connections: each stored key is re-encrypted as an envelope bound to its connection
  id and base URL (models.crypto). Needs PSA_WRITEBACK_ENCRYPTION_KEYS; without it (or for
  a row whose keys do not decrypt) the rows are left in the legacy form, which the worker
  still reads, and `psa-writeback rotate-keys` binds them later. Downgrade unwraps the
  envelopes again (same condition), since older code would send the envelope as the key.
- writeback_jobs: the idempotency key is unique per account, not globally (a downgrade
  fails while two accounts share a key: rename one first).
- ai_session_messages.created_at and ai_session_context.updated_at get server defaults, so
  the web app's INSERT may name only the documented columns.
"""
import logging

from alembic import op
import sqlalchemy as sa


revision = '0007_tenant_hardening'
down_revision = '0006_note_watermark'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    with op.batch_alter_table('writeback_jobs') as batch:
        batch.drop_constraint('uq_writeback_jobs_idempotency_key', type_='unique')
        batch.create_unique_constraint('uq_writeback_jobs_account_idempotency_key',
                                       ['account_id', 'idempotency_key'])
    with op.batch_alter_table('ai_session_messages') as batch:
        batch.alter_column('created_at', existing_type=sa.DateTime(timezone=True), existing_nullable=False,
                           server_default=sa.text('CURRENT_TIMESTAMP'))
    with op.batch_alter_table('ai_session_context') as batch:
        batch.alter_column('updated_at', existing_type=sa.DateTime(timezone=True), existing_nullable=False,
                           server_default=sa.text('CURRENT_TIMESTAMP'))
    _convert_keys(bind_them=True)


def downgrade() -> None:
    _convert_keys(bind_them=False)
    with op.batch_alter_table('ai_session_context') as batch:
        batch.alter_column('updated_at', existing_type=sa.DateTime(timezone=True), existing_nullable=False,
                           server_default=None)
    with op.batch_alter_table('ai_session_messages') as batch:
        batch.alter_column('created_at', existing_type=sa.DateTime(timezone=True), existing_nullable=False,
                           server_default=None)
    with op.batch_alter_table('writeback_jobs') as batch:
        batch.drop_constraint('uq_writeback_jobs_account_idempotency_key', type_='unique')
        batch.create_unique_constraint('uq_writeback_jobs_idempotency_key', ['idempotency_key'])


def _convert_keys(*, bind_them: bool) -> None:
    from models import crypto

    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, base_url, provider, public_key_encrypted, private_key_encrypted "
                                "FROM psa_connections ORDER BY id")).all()
    if not rows:
        return
    if not crypto.keys_configured():
        log.warning("%s is not set: %d PSA connection(s) keep their %s key form; run `psa-writeback "
                    "rotate-keys` with the keys set", crypto.ENV_VAR, len(rows), "legacy" if bind_them else "bound")
        return
    for row in rows:
        try:
            tokens = [_convert(bytes(t), row, bind_them) for t in (row.public_key_encrypted, row.private_key_encrypted)]
        except crypto.ConfigurationError as err:
            log.warning("PSA connection %s left as it is: %s", row.id, err)
            continue
        if tokens[0] is None and tokens[1] is None:
            continue
        conn.execute(sa.text("UPDATE psa_connections SET public_key_encrypted = :pub, private_key_encrypted = :priv "
                             "WHERE id = :id"),
                     {"id": row.id, "pub": tokens[0] or bytes(row.public_key_encrypted),
                      "priv": tokens[1] or bytes(row.private_key_encrypted)})


def _convert(token: bytes, row, bind_them: bool) -> bytes | None:
    """The token in the target form, or None when it already is in that form."""
    from models import crypto

    plaintext = crypto.decrypt(token)
    envelope = crypto.parse_envelope(plaintext)
    if bind_them:
        return None if envelope is not None else crypto.encrypt_bound(
            plaintext, conn_id=row.id, base_url=row.base_url, provider=row.provider)
    return None if envelope is None else crypto.encrypt(envelope["key"])
