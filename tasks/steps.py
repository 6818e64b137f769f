"""The two domain steps of a writeback, as plain functions over a Provider.

Note step and idempotency. No PSA accepts an idempotency key for notes, so a POST that
may have reached the PSA (a timeout, a reset, a worker killed mid-call) is never repeated
blind. Before the *first* POST we list the ticket's recent notes and remember which ones
already carry exactly our text (the baseline, normally empty) and the newest note's id
(the watermark), and commit that as the "intent". Any later execution that finds the
intent lists every note newer than the watermark (however many were added meanwhile): a
note with our exact text and visibility that is not in the baseline is ours, and we adopt
its id instead of posting again.

How a note is recognised, and why:
- By its content (normalised text + visibility), not by a marker. The resolution note is
  customer-visible (portal, "send notes as email"): it must read exactly as the engineer
  approved it. A marker, even an HTML comment or a zero-width character, shows up in
  emails, in copy/paste and in CW's own markdown rendering. One rule for internal notes
  too: one code path, nothing to get wrong per visibility.
- "Not in the baseline" makes identical text safe: writebacks of one ticket run one at a
  time in enqueue order (the claim), so an earlier job's identical note is already on the
  ticket when this job takes its baseline, and is never mistaken for ours.
- The only residual risk is a human posting our exact text, with the same visibility, on
  the same ticket between our intent and our retry; we would adopt theirs instead of
  posting (no duplicate, and the customer sees the text once). We accept that.
- Timing: a POST whose reply we never saw may land late. The lease is renewed right before
  every POST and outlasts the POST's call deadline (tasks.store.min_lease_seconds), and a retry
  after an unanswered POST waits at least the read timeout (tasks.retry), so the next
  execution lists the notes only once a late POST had time to land.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from models import settings
from models.enums import NoteState, NoteVisibility
from providers.base import PostedNote, Provider, Ticket
from tasks.store import ClaimedJob

RECENT_NOTES = 50


def normalise(text: str) -> str:
    # CW trims trailing whitespace and may rewrite line endings; compare what survives.
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n"))


def _ours(note: PostedNote, text: str, visibility: NoteVisibility) -> bool:
    return note.visibility is visibility and normalise(note.text) == normalise(text)


@dataclass(frozen=True)
class NoteResult:
    external_id: str
    adopted: bool
    # Recorded as posted by an earlier execution (a retry after the note step, a reapply):
    # nothing was posted or looked up this time.
    earlier: bool = False


def post_note_once(provider: Provider, job: ClaimedJob, *,
                   record_intent: Callable[[list[str], str | None], None],
                   record_posted: Callable[[str, bool], object]) -> NoteResult:
    assert job.ticket_id is not None and job.markdown is not None and job.note_visibility is not None
    visibility = NoteVisibility(job.note_visibility)
    if job.note_state == NoteState.POSTED.value and job.note_external_id:
        return NoteResult(job.note_external_id, adopted=False, earlier=True)
    if job.note_state == NoteState.INTENT.value:
        baseline = set(job.note_baseline_ids)
        # Every note newer than the intent's watermark, however many were added since (an
        # intent without one, from before watermarks existed: the most recent notes).
        candidates = (provider.list_notes_after(job.ticket_id, job.note_watermark_id)
                      if job.note_watermark_id is not None else provider.list_recent_notes(job.ticket_id, RECENT_NOTES))
        # Oldest first: if a duplicate ever exists, every execution adopts the same note.
        found = next((n for n in sorted(candidates, key=_note_order) if _ours(n, job.markdown, visibility)
                      and n.id not in baseline), None)
        if found is not None:
            record_posted(found.id, True)
            return NoteResult(found.id, adopted=True)
        baseline_ids, watermark = list(job.note_baseline_ids), job.note_watermark_id  # the first intent's
    else:
        recent = provider.list_recent_notes(job.ticket_id, RECENT_NOTES)
        baseline_ids = [n.id for n in recent if _ours(n, job.markdown, visibility)]
        watermark = _watermark(recent)
    record_intent(baseline_ids, watermark)  # committed (with a fresh lease) before every POST
    note = provider.post_note(job.ticket_id, job.markdown, visibility)
    record_posted(note.id, False)
    return NoteResult(note.id, adopted=False)


def _watermark(recent: list[PostedNote]) -> str | None:
    """The newest note id before our first POST ("0": no notes yet), when ids are integers
    (they only grow, so everything after it was posted after our listing); otherwise None,
    and a reconcile looks among the most recent notes."""
    if not all(_numeric(n.id) for n in recent):
        return None
    return str(max((int(n.id) for n in recent), default=0))


def _numeric(note_id: str) -> bool:
    # A PSA chooses its ids: one longer than the column that stores a watermark (64) is no
    # integer id we can page by (and int() refuses strings of over 4,300 digits).
    return note_id.isdigit() and len(note_id) <= 64


def _note_order(note: PostedNote) -> tuple[int, str]:
    return (int(note.id), "") if _numeric(note.id) else (0, note.id)


@dataclass(frozen=True)
class TransitionResult:
    verified: bool
    patched: bool
    expected_id: int
    expected_name: str | None
    observed: Ticket


def verify_reads() -> tuple[int, float]:
    return (settings.integer("VERIFY_READS", 3, positive=True),
            settings.number("VERIFY_INTERVAL_SECONDS", 1.0, minimum=0))


def transition_and_verify(provider: Provider, ticket_id: int, target: int) -> TransitionResult:
    """Read, PATCH only if needed, then re-read until the status shows (a few quick reads:
    some PSAs apply workflow asynchronously). Never PATCHes twice in one execution."""
    before = provider.get_ticket(ticket_id)
    patched = before.status_id != target
    if patched:
        provider.update_status(ticket_id, target)
    reads, interval = verify_reads()
    # Re-read until it shows; when the reads run out, keep the last ticket we saw. An error
    # from a read ends the step at once (the job's retry policy decides what follows).
    observed = provider.get_ticket(ticket_id)
    for _ in range(max(reads, 1) - 1):
        if observed.status_id == target:
            break
        time.sleep(interval)
        observed = provider.get_ticket(ticket_id)
    verified = observed.status_id == target
    expected_name = observed.status_name if verified else _status_name(provider, observed.board_id, target)
    return TransitionResult(verified, patched, target, expected_name, observed)


def _status_name(provider: Provider, board_id: int | None, status_id: int) -> str | None:
    """Best effort, only on the failure path: the alert should say the expected name too."""
    if board_id is None:
        return None
    try:
        return next((s.name for s in provider.list_statuses(board_id) if s.id == status_id), None)
    except Exception:
        return None
