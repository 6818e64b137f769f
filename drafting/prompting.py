"""The prompt: text in drafting/prompts/*.md (read them; they are the prompt), assembled here.

- system = common.md + the kind's format (resolution.md or escalation.md). The system
  prompt never contains session text, so nothing in a session can edit it.
- first user turn = request.md with `$session` replaced by the escaped <session> block
  (drafting.state.render_session) and the instruction repeated *after* the data.
- re-ask = reask.md with `$problem`: the validator's own words about what was wrong.

Bump PROMPT_VERSION when the wording's intent changes. The cache does not depend on it:
the state hash includes `digest()` of every template, so any edit is a cache miss.
Templates use `string.Template` ($name) so Markdown braces need no escaping.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any

from drafting.state import SessionState, render_session
from models.drafts import DraftKind

PROMPT_VERSION = "v2"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TEMPLATES = ("common", "resolution", "escalation", "request", "reask")
KIND_LABELS = {DraftKind.RESOLUTION: "resolution note", DraftKind.ESCALATION: "escalation package"}


@lru_cache(maxsize=None)
def template(name: str) -> str:
    return (PROMPTS_DIR / f"{name}.md").read_text(encoding="utf-8").strip()


@lru_cache(maxsize=1)
def digest() -> str:
    h = hashlib.sha256(PROMPT_VERSION.encode())
    for name in TEMPLATES:
        h.update(b"\0" + name.encode() + b"\0" + template(name).encode("utf-8"))
    return h.hexdigest()


def recorded_version() -> str:
    """What a preview row records: the human version plus the exact text's fingerprint."""
    return f"{PROMPT_VERSION}+{digest()[:12]}"


def system_prompt(kind: DraftKind) -> str:
    return template("common") + "\n\n" + template(kind.value)


def request_text(kind: DraftKind, state: SessionState, max_chars: int) -> str:
    # substitute (not safe_substitute) so a typo in a template fails loudly in tests; the
    # session text goes in as a value and is never itself scanned for $placeholders.
    return Template(template("request")).substitute(session=render_session(state, max_chars),
                                                    kind_label=KIND_LABELS[kind])


def reask_text(kind: DraftKind, problem: str) -> str:
    return Template(template("reask")).substitute(problem=problem, kind_label=KIND_LABELS[kind])


def first_messages(kind: DraftKind, state: SessionState, max_chars: int) -> list[dict[str, Any]]:
    # One user turn holding the whole session as data. Transcript turns are never sent as
    # API messages of their own: an "assistant" turn from the transcript would read as the
    # model's own words, and a transcript could then steer the conversation.
    return [{"role": "user", "content": request_text(kind, state, max_chars)}]
