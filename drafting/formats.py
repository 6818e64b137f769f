"""The two draft formats, enforced by checking the reply (asking nicely is not enough).

Escalation package: exactly five ATX headings, `## Problem`, `## What we've confirmed`,
`## What we've tried`, `## Current hypothesis`, `## Suggested next steps`, in that order,
each with a non-empty body, nothing before the first. Any other heading, at any level, is
an extra section and rejects the reply (headings inside fenced code blocks are content).
Heading matching forgives what does not change meaning: level (# to ######), bold
markers, a trailing colon, case, curly apostrophes. The stored text uses the canonical
`## Title` lines.

Resolution note (customer-facing, plain text with three bold labels, no headings):

    **Issue:** what the customer experienced, in their terms.

    **Resolution:** what we did that fixed it (sentences, or a short "- " list).

    **Next steps:** what the customer needs to do, or "No action is needed on your side."

Exactly those three labels, in that order, each starting a line, none empty, nothing
before `**Issue:**`, no headings, at most RESOLUTION_MAX_CHARS characters.

Both: what the text may contain (images, raw HTML, links) is drafting.content's check,
made on every reply after its shape.

`check()` returns the normalised Markdown or raises FormatProblem, whose message is
what the re-ask shows the model (and what a failed draft records).
"""
from __future__ import annotations

import re

from drafting import content
from drafting.errors import FormatProblem
from models.drafts import DraftKind
from tasks import validation as v
from tasks.errors import RequestError

ESCALATION_SECTIONS = ("Problem", "What we've confirmed", "What we've tried", "Current hypothesis",
                       "Suggested next steps")
RESOLUTION_PARTS = ("Issue", "Resolution", "Next steps")
RESOLUTION_MAX_CHARS = 2500

_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LABEL = re.compile(r"^\*\*([^*\n]{1,40}?)(?::\*\*|\*\*[ \t]*:)[ \t]*(.*)$")


def check(kind: DraftKind, text: str, allowed_hosts: frozenset[str] = frozenset()) -> str:
    """`allowed_hosts`: the hosts a resolution note may link to, those the session's own
    text mentions (drafting.content.session_hosts)."""
    text = (text or "").replace("\r\n", "\n").strip()
    if not text:
        raise FormatProblem("the reply is empty")
    try:
        markdown = check_escalation(text) if kind is DraftKind.ESCALATION else check_resolution(text)
    except FormatProblem as err:
        # One re-ask: name what the content check finds too, so the model can fix it all at once.
        raise FormatProblem("; ".join([str(err), *content.problems(kind, text, allowed_hosts)])) from None
    if found := content.problems(kind, markdown, allowed_hosts):
        raise FormatProblem("; ".join(found) + ".")
    try:
        return v.markdown(markdown)  # the same rules the writeback applies when it is posted
    except RequestError as err:
        raise FormatProblem(err.message.replace("markdown", "the note", 1)) from None


def check_escalation(text: str) -> str:
    preamble, sections = _split_sections(text)
    titles = [title for title, _ in sections]
    problems = _membership(titles, ESCALATION_SECTIONS, "section")
    if preamble.strip():
        problems.append("there is text before the first heading")
    problems += [f"section '{title}' is empty" for title, body in sections if not body.strip()]
    if problems:
        raise FormatProblem("; ".join(problems) + ". " + _required_sections())
    canonical = {_norm(name): name for name in ESCALATION_SECTIONS}
    return "\n\n".join(f"## {canonical[_norm(title)]}\n\n{body.strip()}" for title, body in sections)


def check_resolution(text: str) -> str:
    preamble, parts, headings = _split_labels(text)
    labels = [label for label, _ in parts]
    problems = _membership(labels, RESOLUTION_PARTS, "part")
    if preamble.strip():
        problems.append("there is text before **Issue:**")
    if headings:
        problems.append(f"it uses Markdown headings ({', '.join(repr(h) for h in headings[:3])}), which the "
                        "customer note must not have")
    problems += [f"part '{label}' is empty" for label, body in parts if not body.strip()]
    if len(text) > RESOLUTION_MAX_CHARS:
        problems.append(f"it is {len(text)} characters long; keep it under about 150 words")
    if problems:
        raise FormatProblem("; ".join(problems) + ". Required: exactly **Issue:**, **Resolution:** and "
                            "**Next steps:**, in that order, each starting a line, and nothing else")
    canonical = {_norm(name): name for name in RESOLUTION_PARTS}
    return "\n\n".join(_render_part(canonical[_norm(label)], body) for label, body in parts)


def _render_part(name: str, body: str) -> str:
    # A part whose text starts on the next line (typically a "- " list) keeps it there:
    # pulling "- step" up beside the label would turn the list's first item into prose.
    inline = body.split("\n", 1)[0].strip()
    return f"**{name}:**{' ' if inline else chr(10)}{body.strip()}"


def _membership(found: list[str], required: tuple[str, ...], what: str) -> list[str]:
    wanted = [_norm(name) for name in required]
    seen = [_norm(name) for name in found]
    problems = []
    if missing := [name for name, key in zip(required, wanted) if key not in seen]:
        problems.append(f"missing {what}(s): {', '.join(repr(m) for m in missing)}")
    if extra := [name for name, key in zip(found, seen) if key not in wanted]:
        # Titles are cut short: they are model output a transcript may have steered, and
        # this reason is stored, logged and shown in Flower.
        problems.append(f"unexpected {what}(s): {', '.join(repr(e[:60]) for e in extra[:5])}")
    if dupes := sorted({name for name, key in zip(found, seen) if seen.count(key) > 1 and key in wanted}):
        problems.append(f"repeated {what}(s): {', '.join(repr(d) for d in dupes)}")
    if not problems and seen != wanted:
        problems.append(f"{what}s are out of order ({', '.join(found)})")
    return problems


def _required_sections() -> str:
    return "Required: exactly these five '## ' sections in this order: " + ", ".join(ESCALATION_SECTIONS)


def _split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            sections.append((heading.group(1).strip(), []))
        else:
            (sections[-1][1] if sections else preamble).append(line)
    return "\n".join(preamble), [(title, "\n".join(body)) for title, body in sections]


def _split_labels(text: str) -> tuple[str, list[tuple[str, str]], list[str]]:
    preamble: list[str] = []
    parts: list[tuple[str, list[str]]] = []
    headings: list[str] = []
    for line in text.split("\n"):
        if heading := _HEADING.match(line):
            headings.append(heading.group(1).strip())
        if label := _LABEL.match(line):
            parts.append((label.group(1).strip(), [label.group(2)]))
        else:
            (parts[-1][1] if parts else preamble).append(line)
    return "\n".join(preamble), [(label, "\n".join(body)) for label, body in parts], headings


def _norm(title: str) -> str:
    title = title.strip().strip("*_").strip().rstrip(":").strip()
    return " ".join(title.replace("\u2019", "'").replace("\u2018", "'").split()).casefold()
