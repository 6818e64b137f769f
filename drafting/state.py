"""A session's drafting input: loading it, hashing it, rendering it as escaped data.

The state hash covers everything a draft is made from (title, ticket summary and
description, every transcript turn) plus the prompt digest, so an edited prompt can never
serve a preview drafted under the old one. The kind is not in the hash: it is its own
part of the cache key, which is what lets both kinds of one state coexist.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from html import escape
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import AiSession, AiSessionContext, AiSessionMessage
from tasks.errors import NotFoundError, RequestError


@dataclass(frozen=True)
class Turn:
    position: int
    role: str
    content: str


@dataclass(frozen=True)
class SessionState:
    session_id: int
    title: str
    ticket_summary: str
    ticket_description: str
    turns: tuple[Turn, ...]

    def texts(self) -> list[str]:
        """Everything the session says, as written (what a customer note may refer to)."""
        return [self.title, self.ticket_summary, self.ticket_description, *(t.content for t in self.turns)]

    def canonical(self) -> dict[str, Any]:
        return {"title": self.title, "ticket_summary": self.ticket_summary,
                "ticket_description": self.ticket_description,
                "turns": [[t.position, t.role, t.content] for t in self.turns]}


def load_state(db: Session, session_id: int) -> SessionState:
    session = db.get(AiSession, session_id)
    if session is None:
        raise NotFoundError(f"unknown session {session_id}", field="session_id")
    context = db.get(AiSessionContext, session_id)
    turns = tuple(Turn(m.position, m.role, m.content) for m in db.scalars(
        select(AiSessionMessage).where(AiSessionMessage.session_id == session_id)
        .order_by(AiSessionMessage.position)))
    if not any(t.content.strip() for t in turns):
        raise RequestError(f"session {session_id} has no transcript messages: there is nothing to draft from",
                           field="session_id")
    return SessionState(session_id=session.id, title=session.title or "",
                        ticket_summary=(context.ticket_summary or "") if context else "",
                        ticket_description=(context.ticket_description or "") if context else "",
                        turns=turns)


def state_hash(state: SessionState, prompt_digest: str) -> str:
    # sort_keys + fixed separators: the same state always serialises to the same bytes.
    payload = json.dumps({"prompt": prompt_digest, "state": state.canonical()}, sort_keys=True,
                         separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def render_session(state: SessionState, max_chars: int) -> str:
    """The session as an XML-ish block in which every piece of session text is escaped:
    no `<` survives from the data, so a transcript cannot close <transcript> or <session>
    early or open an element of its own."""
    lines = ["<session>", f"<title>{_text(state.title)}</title>"]
    if state.ticket_summary:
        lines.append(f"<ticket_summary>{_text(state.ticket_summary)}</ticket_summary>")
    if state.ticket_description:
        lines.append(f"<ticket_description>{_text(state.ticket_description)}</ticket_description>")
    lines.append("<transcript>")
    kept, omitted = _fit(state.turns, max_chars)
    for i, turn in enumerate(kept):
        lines.append(f'<message position="{turn.position}" role="{escape(turn.role, quote=True)}">')
        lines.append(_text(turn.content))
        lines.append("</message>")
        if omitted and i == 0:
            lines.append(f'<omitted messages="{omitted}"/>')
    lines += ["</transcript>", "</session>"]
    return "\n".join(lines)


def _text(value: str) -> str:
    return escape(value, quote=False)


def _fit(turns: tuple[Turn, ...], max_chars: int) -> tuple[list[Turn], int]:
    """Keep the first turn (the reported problem) and as many of the latest turns as fit:
    the end of a session says what was last tried and where it stands."""
    if sum(len(t.content) for t in turns) <= max_chars:
        return list(turns), 0
    first, rest = turns[0], list(turns[1:])
    if len(first.content) > max_chars // 2:
        first = Turn(first.position, first.role, first.content[:max_chars // 2] + " [...]")
    budget = max_chars - len(first.content)
    tail: list[Turn] = []
    for turn in reversed(rest):
        if len(turn.content) > budget:
            break
        tail.append(turn)
        budget -= len(turn.content)
    tail.reverse()
    return [first, *tail], len(rest) - len(tail)
