"""`psa-writeback rotate-keys`: every stored PSA key re-encrypted with the current key.

After an operator puts a new key first in PSA_WRITEBACK_ENCRYPTION_KEYS (`NEW,OLD`), this
re-encrypts each connection's keys with NEW (MultiFernet.rotate), and binds any key still in
the legacy form (written before keys were bound to their connection) to its connection id
and base URL. Once it reports no failure, OLD can be removed from the variable.

One short transaction per connection (read, then a compare-and-set UPDATE), decryption
outside both, so a long run never holds locks and a concurrent add or re-key of the same
row is never overwritten (that row is reported and the next run picks it up). Running it
again changes nothing: already-current rows are only counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, update

from models import PsaConnection
from models import crypto
from models.crypto import ConfigurationError
from models.db import session_scope

_C = PsaConnection


@dataclass
class RotationReport:
    rotated: list[int] = field(default_factory=list)  # re-encrypted (and bound, if they were legacy)
    bound: list[int] = field(default_factory=list)  # of `rotated`, those that were legacy (unbound)
    current: list[int] = field(default_factory=list)  # already bound and encrypted with the first key
    failed: list[tuple[int, str]] = field(default_factory=list)  # (connection id, reason)

    def as_dict(self) -> dict[str, object]:
        return {"rotated": len(self.rotated), "bound": len(self.bound), "already_current": len(self.current),
                "failed": [{"connection_id": cid, "reason": why} for cid, why in self.failed]}


def rotate_keys() -> RotationReport:
    crypto.require_keys()  # no key configured: one clear ConfigurationError before touching any row
    with session_scope() as db:
        ids = list(db.scalars(select(_C.id).order_by(_C.id)))
    report = RotationReport()
    for conn_id in ids:
        _rotate_one(conn_id, report)
    return report


def _rotate_one(conn_id: int, report: RotationReport) -> None:
    with session_scope() as db:
        row = db.execute(select(_C.base_url, _C.provider, _C.public_key_encrypted, _C.private_key_encrypted)
                         .where(_C.id == conn_id)).first()
    if row is None:
        return  # deleted meanwhile: nothing to rotate
    public, private = bytes(row.public_key_encrypted), bytes(row.private_key_encrypted)
    bind = dict(conn_id=conn_id, base_url=row.base_url, provider=row.provider)
    try:
        new_public, how_public = crypto.rewrap(public, **bind)
        new_private, how_private = crypto.rewrap(private, **bind)
    except ConfigurationError as err:
        report.failed.append((conn_id, str(err)))
        return
    if new_public is None and new_private is None:
        report.current.append(conn_id)
        return
    with session_scope() as db:
        changed = db.execute(update(_C).where(_C.id == conn_id, _C.public_key_encrypted == public,
                                              _C.private_key_encrypted == private, _C.base_url == row.base_url)
                             .values(public_key_encrypted=new_public or public,
                                     private_key_encrypted=new_private or private)
                             .execution_options(synchronize_session=False)).rowcount
    if not changed:
        report.failed.append((conn_id, f"PSA connection {conn_id} changed while it was being rotated; run again"))
        return
    report.rotated.append(conn_id)
    if "bound" in (how_public, how_private):
        report.bound.append(conn_id)
