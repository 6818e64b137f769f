"""What a draft may contain, beyond its shape (drafting.formats): the checks made for text
that goes to a customer.

The ticket description is written by the MSP's customer, so a prompt injection there can
ask the model to plant a tracking image or a phishing link in a note the customer then
receives from their MSP. So:

- Resolution note (customer-facing): no images (`![..](..)`, `![..][ref]`, `![ref]`
  with a definition), no raw HTML anywhere (a tag, a comment, a declaration: `<img
  onerror=...>`, `<a href>`, `<script>`, `<iframe>`, even `<b>`; the note is Markdown, and a
  renderer that passes HTML through would run it), and links (`[..](url)`, reference
  definitions, `<url>` autolinks, bare `https://` / `www.` addresses) only to hosts that
  appear in the session's own text (title, ticket summary and description, transcript), over
  http(s) or mailto, with nothing in the address that reads differently to a browser than
  to a parser (a backslash, whitespace, a control character). Code spans are checked too:
  not every PSA renders them as code.
- Escalation package (internal): no images and no raw HTML outside code (an engineer's
  note may quote markup in a code span or block, which every renderer shows as text).

A host "appears" when the session's text holds it as a whole host name (`portal.acme.com`
in a sentence, a URL or an e-mail address). The session's text includes the customer's
own description: a host the customer wrote there can be linked. That is the engineer's to
judge in the preview; what the checks stop is a host nobody in the session mentioned.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from models.drafts import DraftKind

_FENCED = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_IMAGE = re.compile(r"!\[[^\]\n]*\][ \t]*[(\[]")
_IMAGE_SHORTCUT = re.compile(r"!\[([^\]\n]+)\]")
_HTML = re.compile(r"<(?:/?[A-Za-z][A-Za-z0-9-]*(?=[\s/>])|!--|!\[CDATA\[|![A-Za-z]|\?[A-Za-z])")
_REF_DEF = re.compile(r"^ {0,3}\[([^\]\n]+)\]:[ \t]*<?([^\s>]*)>?", re.M)
_INLINE_DEST = re.compile(r"\]\([ \t]*(<[^>\n]*>|[^)\s]*)")
_AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>]*)>")
_BARE = re.compile(r"(?i)(?<![\w@/.-])(?:[a-z][a-z0-9+.-]{1,31}://|www\.)[^\s<>()\[\]`'\"]*")
_HOST = re.compile(r"[\w-]+(?:\.[\w-]+)+")
_SCHEMES = ("http", "https", "mailto")
_SHOWN = 60  # a quoted piece of the reply is cut (it is stored, logged and shown in Flower)


def session_hosts(texts: Iterable[str]) -> frozenset[str]:
    """Every host name the session's own text mentions, lower-cased (`www.` dropped)."""
    return frozenset(_bare_host(h) for text in texts for h in _HOST.findall((text or "").casefold()))


def problems(kind: DraftKind, markdown: str, allowed_hosts: frozenset[str]) -> list[str]:
    customer = kind is DraftKind.RESOLUTION
    rendered = markdown if customer else _CODE_SPAN.sub("", _FENCED.sub("", markdown))
    found = []
    images = _IMAGE.findall(rendered) + [m.group(0) for m in _IMAGE_SHORTCUT.finditer(rendered)
                                        if _defined(rendered, m.group(1))]
    whom = "a customer note" if customer else "the package"
    if images:
        found.append(f"it contains an image ({_shown(images[0])}...), which {whom} must not have")
    if html := _HTML.search(rendered):
        tag = rendered[html.start():html.start() + 20].split("\n")[0]
        found.append(f"it contains raw HTML ({_shown(tag)}...), which {whom} must not have: write plain Markdown")
    if customer:
        found += _link_problems(markdown, allowed_hosts)
    return found


def _link_problems(markdown: str, allowed: frozenset[str]) -> list[str]:
    found, foreign = [], []
    for target in _link_targets(markdown):
        reason = _refused(target, allowed)
        if reason == "host":
            foreign.append(_host_of(target))
        elif reason:
            found.append(f"it links to {_shown(target)!r}, {reason}")
    if foreign:
        hosts = ", ".join(sorted({_shown(h) for h in foreign})[:3])
        found.append(f"it links to a host the session does not mention ({hosts}): link only to addresses "
                     "that appear in the session, or leave the link out")
    return found


def _link_targets(markdown: str) -> list[str]:
    targets = [d.strip("<>") for d in _INLINE_DEST.findall(markdown)]
    targets += [dest for _, dest in _REF_DEF.findall(markdown)]
    targets += _AUTOLINK.findall(markdown)
    targets += _BARE.findall(markdown)
    return [t for t in targets if t]


def _refused(target: str, allowed: frozenset[str]) -> str | None:
    if re.search(r"[\s\\\x00-\x1f\x7f]", target):
        return "an address a browser would read differently (a backslash or whitespace in it)"
    url = "http://" + target if target.casefold().startswith("www.") else target
    parts = urlsplit(url)
    scheme = parts.scheme.casefold()
    if scheme not in _SCHEMES:
        return "which is not an http(s) or mailto address" if scheme else "which has no host"
    host = _host_of(target)
    if not host:
        return "which has no host"
    return None if host in allowed else "host"


def _host_of(target: str) -> str:
    url = "http://" + target if target.casefold().startswith("www.") else target
    parts = urlsplit(url)
    if parts.scheme.casefold() == "mailto":
        return _bare_host(parts.path.rpartition("@")[2].split("?")[0].casefold())
    try:
        return _bare_host(parts.hostname or "")
    except ValueError:
        return ""


def _bare_host(host: str) -> str:
    host = host.strip(".").casefold()
    return host[4:] if host.startswith("www.") else host


def _defined(markdown: str, label: str) -> bool:
    return any(ref.casefold() == label.casefold() for ref, _ in _REF_DEF.findall(markdown))


def _shown(text: str) -> str:
    # Quoted model output on one line: the reason is logged, and shown in Flower.
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", "?", text[:_SHOWN])
