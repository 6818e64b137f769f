"""SQLAlchemy models, engine/session setup and migrations."""
from models.accounts import AccountSettings, PsaConnection
from models.alerts import Alert, AlertKind, DeliveryState, JobAction  # noqa: F401  (operations: alerts, operator actions)
from models.base import Base, utcnow
from models.drafts import AiSessionContext, AiSessionMessage, DraftKind, DraftPreview, DraftStatus
from models.enums import (
    CLAIMABLE_STATES,
    TERMINAL_STATES,
    AttemptOutcome,
    JobKind,
    JobState,
    NoteState,
    NoteVisibility,
    SessionStatus,
)
from models.jobs import WritebackAttempt, WritebackJob
from models.sessions import AiSession

__all__ = [
    "AccountSettings", "AiSession", "AiSessionContext", "AiSessionMessage", "DraftKind", "DraftPreview",
    "DraftStatus", "AttemptOutcome", "Base", "CLAIMABLE_STATES", "JobKind",
    "JobState", "NoteState", "NoteVisibility", "PsaConnection", "SessionStatus", "TERMINAL_STATES",
    "WritebackAttempt", "WritebackJob", "utcnow",
]
