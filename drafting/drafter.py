"""Ask, check the format, re-ask once with the problem named, give up with that reason."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from drafting import content, formats, prompting
from drafting.client import ModelReply, Usage, ask
from drafting.config import DraftConfig
from drafting.errors import FormatProblem, InvalidDraft
from drafting.state import SessionState
from models.drafts import DraftKind

log = logging.getLogger("psa_writeback.drafting")


@dataclass(frozen=True)
class Draft:
    markdown: str
    asks: int  # 1, or 2 when the first reply was rejected


def draft(cfg: DraftConfig, kind: DraftKind, state: SessionState, usage: Usage, *, context: str = "") -> Draft:
    system = prompting.system_prompt(kind)
    messages = prompting.first_messages(kind, state, cfg.max_transcript_chars)
    hosts = content.session_hosts(state.texts())  # the hosts a customer note may link to
    reply = ask(cfg, system, messages, usage, context=context)
    try:
        return Draft(accept(cfg, kind, reply, hosts), asks=1)
    except FormatProblem as err:
        problem = str(err)
    log.info("draft %s: reply rejected (%s); asking once more", context, problem)
    reply = ask(cfg, system, reask_messages(kind, messages, reply, problem), usage, context=context)
    try:
        return Draft(accept(cfg, kind, reply, hosts), asks=2)
    except FormatProblem as err:
        label = prompting.KIND_LABELS[kind]
        raise InvalidDraft(f"the {label} did not follow the required format, even after one re-ask: {err}") from None


def accept(cfg: DraftConfig, kind: DraftKind, reply: ModelReply, hosts: frozenset[str] = frozenset()) -> str:
    if reply.stop_reason == "max_tokens":
        raise FormatProblem(f"the reply was cut off at the {cfg.max_tokens}-token limit; it must be shorter")
    if reply.stop_reason == "refusal":
        raise FormatProblem("the reply was a refusal, not the note")
    return formats.check(kind, reply.text, hosts)


def reask_messages(kind: DraftKind, messages: list[dict[str, Any]], reply: ModelReply,
                   problem: str) -> list[dict[str, Any]]:
    reask = prompting.reask_text(kind, problem)
    if reply.text.strip():
        # The rejected reply goes back as the assistant's turn so the model can see what
        # the named problem refers to.
        return [*messages, {"role": "assistant", "content": reply.text}, {"role": "user", "content": reask}]
    # The API refuses an empty assistant turn: fold the re-ask into the one user turn.
    return [{"role": "user", "content": messages[0]["content"] + "\n\n" + reask}]
