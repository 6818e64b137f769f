"""Sessions with transcripts, replies in both formats, and waiting for a preview."""
from __future__ import annotations

from sqlalchemy import select

from models import AiSessionContext, AiSessionMessage, DraftPreview
from models.db import session_scope
from tasks import admin
from tests.harness import wait_for

TERMINAL = ("succeeded", "failed", "superseded")

TRANSCRIPT = [
    ("engineer", "Customer reports Outlook asks for the password every few minutes since Monday."),
    ("assistant", "Check Credential Manager for stale entries and confirm modern auth is enabled."),
    ("engineer", "Removed two stale MicrosoftOffice16 entries. Modern auth is on. Still prompting."),
    ("assistant", "Try a new Outlook profile; a corrupt profile often causes repeated prompts."),
    ("engineer", "New profile fixed it. No prompts for 30 minutes."),
]

GOOD_ESCALATION = """## Problem
Outlook prompts for the password every few minutes since Monday.

## What we've confirmed
- Modern authentication is enabled.

## What we've tried
- Removed two stale MicrosoftOffice16 credentials: no change.

## Current hypothesis
A corrupt Outlook profile.

## Suggested next steps
1. Create a new Outlook profile."""

GOOD_RESOLUTION = """**Issue:** Outlook kept asking for your password every few minutes.

**Resolution:** We created a fresh Outlook profile, which stopped the prompts.

**Next steps:** No action is needed on your side."""

MISSING_HYPOTHESIS = GOOD_ESCALATION.replace("## Current hypothesis\nA corrupt Outlook profile.\n\n", "")


def make_session(transcript=TRANSCRIPT, *, title: str = "Outlook password prompts",
                 summary: str | None = "Outlook keeps asking for password", account_id: int = 1) -> int:
    with session_scope() as db:
        session = admin.create_session(db, account_id=account_id, title=title)
        for position, (role, content) in enumerate(transcript, start=1):
            db.add(AiSessionMessage(session_id=session.id, position=position, role=role, content=content))
        if summary is not None:
            db.add(AiSessionContext(session_id=session.id, ticket_summary=summary,
                                    ticket_description="User: Outlook pops up a login box all the time."))
        return session.id


def add_message(session_id: int, role: str, content: str) -> None:
    with session_scope() as db:
        last = db.scalar(select(AiSessionMessage.position).where(AiSessionMessage.session_id == session_id)
                         .order_by(AiSessionMessage.position.desc()).limit(1)) or 0
        db.add(AiSessionMessage(session_id=session_id, position=last + 1, role=role, content=content))


def preview(preview_id: int) -> DraftPreview:
    with session_scope() as db:
        return db.get(DraftPreview, preview_id)


def previews(session_id: int) -> list[DraftPreview]:
    with session_scope() as db:
        return list(db.scalars(select(DraftPreview).where(DraftPreview.session_id == session_id)
                               .order_by(DraftPreview.id)))


def wait_preview(preview_id: int, timeout: float = 20) -> DraftPreview:
    return wait_for(lambda: (p := preview(preview_id)) is not None and p.status in TERMINAL and p,
                    timeout=timeout, message=f"preview {preview_id} to finish")
