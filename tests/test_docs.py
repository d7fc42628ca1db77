"""The README and docs/ say what the code does, and their links lead somewhere.

The README is the user's manual: short enough to read (at most 400 lines), with the
table of reason codes a user looks up when a row says ``skipped`` or ``error``. That
table must list exactly the codes predict can write, so it is checked against
:class:`pneumobatch.core.errors.Reason`. Every relative link in README.md and docs/*.md
must lead to an existing file and, with a ``#anchor``, to a heading of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

from pneumobatch.core.errors import Reason
from tests.helpers import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks (code is not Markdown)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _headings(path: Path) -> list[str]:
    return [m.group(2) for line in _prose_lines(path) if (m := _HEADING.match(line))]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _links(path: Path) -> list[str]:
    # the whole prose at once: a link's text may wrap onto the next line
    return _LINK.findall(_CODE_SPAN.sub("", "\n".join(_prose_lines(path))))


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _readme_reason_rows() -> set[tuple[str, str]]:
    lines = _prose_lines(README)
    start = next(
        i
        for i, line in enumerate(lines)
        if [c.strip() for c in line.strip().strip("|").split("|")] == ["status", "reason", "meaning"]
    )
    rows = set()
    for line in lines[start + 2 :]:  # past the header and its --- line
        if not line.startswith("|"):
            break
        status, reason = (c.strip() for c in line.strip().strip("|").split("|")[:2])
        rows.add((status, reason.strip("`")))
    return rows


def test_readme_reason_table_lists_exactly_the_reason_codes_predict_writes():
    expected = {(reason.status.value, reason.value) for reason in Reason} | {("ok", "")}
    table = _readme_reason_rows()
    assert table == expected, (
        f"in the README but not in errors.Reason: {sorted(table - expected)}; "
        f"in errors.Reason but not in the README: {sorted(expected - table)}"
    )


def test_every_relative_link_in_readme_and_docs_leads_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if _is_external(target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in {_anchor(h) for h in _headings(linked)}:
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {linked.relative_to(ROOT)})")
    assert not broken, "\n".join(broken)


def test_readme_is_at_most_400_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 400, f"README.md has {lines} lines; move reference material to docs/"


def test_headings_are_unique_within_each_page_so_anchors_are_unambiguous():
    for page in PAGES:
        anchors = [_anchor(h) for h in _headings(page)]
        repeated = sorted({a for a in anchors if anchors.count(a) > 1})
        assert not repeated, f"{page.relative_to(ROOT)}: headings repeated: {repeated}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README) if not _is_external(t)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages a README reader cannot find: {unlinked}"


def test_anchor_rule_matches_github():
    assert _anchor("Nightly jobs, interruptions and exit codes") == "nightly-jobs-interruptions-and-exit-codes"
    assert _anchor("1. Decode and resize") == "1-decode-and-resize"
    assert _anchor("Ray's messages") == "rays-messages"
    assert _anchor("The monitoring block in run.json") == "the-monitoring-block-in-runjson"
    assert _anchor("etiology (normal / bacterial)") == "etiology-normal--bacterial"
