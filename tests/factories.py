"""Test data builders. Credentials are the simulator's obviously fake ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import WritebackAttempt, WritebackJob, AiSession
from models.db import session_scope
from providers import REGISTRY
from providers.simulators.connectwise import SimulatorServer
from providers.simulators.kits import Kit, kit_for
from sqlalchemy import select
from tasks import admin
from tests.harness import wait_for

RESOLVED, ESCALATED = 9, 7  # the ConnectWise simulator's (providers.simulators.kits)
TERMINAL = ("succeeded", "failed", "verification_failed", "cancelled")


@dataclass
class World:
    sim: SimulatorServer
    account_id: int
    connection_id: int

    @classmethod
    def create(cls, sim: SimulatorServer, account_id: int = 1, prefs: dict[str, Any] | None = None) -> "World":
        kit = kit_for(sim)  # any provider's simulator (providers.simulators.kits)
        with session_scope() as db:
            conn = admin.add_connection(db, account_id=account_id, **kit.connection(sim))
            admin.set_preferences(db, account_id, prefs if prefs is not None else
                                  kit.prefs(REGISTRY[kit.provider].preference_prefix))
            return cls(sim, account_id, conn.id)

    @property
    def kit(self) -> Kit:
        return kit_for(self.sim)

    def session(self, ticket_id: int | None = None, *, status_id: int = 1, linked: bool = True,
                **ticket_opts: Any) -> int:
        if linked and ticket_id is not None and ticket_id not in self.sim.state.tickets:
            self.sim.state.add_ticket(ticket_id, status_id=status_id, **ticket_opts)
        with session_scope() as db:
            s = admin.create_session(db, account_id=self.account_id,
                                     psa_connection_id=self.connection_id if linked else None,
                                     psa_ticket_id=ticket_id if linked else None, title="test session")
            return s.id


def job(job_id: int) -> WritebackJob:
    with session_scope() as db:
        return db.get(WritebackJob, job_id)


def attempts(job_id: int) -> list[WritebackAttempt]:
    with session_scope() as db:
        return list(db.scalars(select(WritebackAttempt).where(WritebackAttempt.job_id == job_id)
                               .order_by(WritebackAttempt.attempt_no)))


def session_row(session_id: int) -> AiSession:
    with session_scope() as db:
        return db.get(AiSession, session_id)


def wait_terminal(job_id: int, timeout: float = 30) -> WritebackJob:
    return wait_for(lambda: (j := job(job_id)) is not None and j.state in TERMINAL and j,
                    timeout=timeout, message=f"job {job_id} to reach a terminal state")
