"""The format checks on their own: what passes, what is rejected, and the reason given."""
from __future__ import annotations

import pytest

from drafting.errors import FormatProblem
from drafting.formats import check
from models import DraftKind
from tests.drafting.builders import GOOD_ESCALATION, GOOD_RESOLUTION, MISSING_HYPOTHESIS

ESC, RES = DraftKind.ESCALATION, DraftKind.RESOLUTION


def _problem(kind: DraftKind, text: str) -> str:
    with pytest.raises(FormatProblem) as info:
        check(kind, text)
    return str(info.value)


def test_escalation_with_the_five_sections_in_order_is_accepted_as_canonical_markdown():
    sloppy = (GOOD_ESCALATION.replace("## What we've confirmed", "### **What we’ve Confirmed:**")
              .replace("## Problem", "# Problem #"))
    out = check(ESC, sloppy + "\n")
    assert [line for line in out.splitlines() if line.startswith("#")] == [
        "## Problem", "## What we've confirmed", "## What we've tried", "## Current hypothesis",
        "## Suggested next steps"]
    assert check(ESC, out) == out  # canonical output is a fixed point


def test_escalation_missing_a_section_names_it():
    assert _problem(ESC, MISSING_HYPOTHESIS).startswith("missing section(s): 'Current hypothesis'.")


def test_escalation_with_an_extra_section_names_it():
    problem = _problem(ESC, GOOD_ESCALATION + "\n\n## Customer impact\nHigh.")
    assert problem.startswith("unexpected section(s): 'Customer impact'.")


def test_escalation_subheading_counts_as_an_extra_section():
    text = GOOD_ESCALATION.replace("## What we've tried\n", "## What we've tried\n### Round one\n")
    assert "unexpected section(s): 'Round one'" in _problem(ESC, text)


def test_escalation_out_of_order_repeated_empty_and_preamble_are_each_named():
    swapped = GOOD_ESCALATION.replace("## Problem", "## TMP").replace("## Current hypothesis", "## Problem") \
        .replace("## TMP", "## Current hypothesis")
    assert "sections are out of order" in _problem(ESC, swapped)
    assert "repeated section(s): 'Problem'" in _problem(ESC, GOOD_ESCALATION + "\n\n## Problem\nAgain.")
    assert "section 'Current hypothesis' is empty" in _problem(
        ESC, GOOD_ESCALATION.replace("A corrupt Outlook profile.", ""))
    assert "text before the first heading" in _problem(ESC, "Here is the package:\n\n" + GOOD_ESCALATION)


def test_heading_lines_inside_a_code_fence_are_content_not_sections():
    text = GOOD_ESCALATION.replace("- Modern authentication is enabled.",
                                   "```\n# grep output\n## not a section\n```")
    assert "## not a section" in check(ESC, text)


def test_resolution_with_the_three_parts_is_accepted_and_a_list_stays_a_list():
    assert check(RES, GOOD_RESOLUTION) == GOOD_RESOLUTION
    listed = GOOD_RESOLUTION.replace("We created a fresh Outlook profile, which stopped the prompts.",
                                     "\n- Removed stale saved passwords\n- Created a fresh Outlook profile")
    assert "**Resolution:**\n- Removed stale saved passwords\n- Created" in check(RES, listed)


@pytest.mark.parametrize("text, reason", [
    (GOOD_RESOLUTION.replace("**Next steps:** No action is needed on your side.", ""), "missing part(s): 'Next steps'"),
    (GOOD_RESOLUTION + "\n\n**Root cause:** maybe the VPN?", "unexpected part(s): 'Root cause'"),
    ("Sure, here it is.\n\n" + GOOD_RESOLUTION, "text before **Issue:**"),
    ("# Resolution note\n" + GOOD_RESOLUTION, "Markdown headings ('Resolution note')"),
    (GOOD_RESOLUTION.replace("No action is needed on your side.", ""), "part 'Next steps' is empty"),
    (GOOD_RESOLUTION.replace("stopped the prompts.", "stopped the prompts. " + "More words. " * 300),
     "keep it under about 150 words"),
])
def test_resolution_format_problems_are_named(text, reason):
    assert reason in _problem(RES, text)


def test_empty_reply_and_control_characters_are_rejected():
    assert _problem(ESC, "  \n") == "the reply is empty"
    assert "control character (U+0007)" in _problem(RES, GOOD_RESOLUTION.replace("Outlook", "Out\x07look", 1))
