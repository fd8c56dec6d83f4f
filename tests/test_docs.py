"""The documentation points at things that exist: every relative link in README.md and docs/ names a file (and, with
#anchor, one of its headings), every tests/test_x.py::test_name it cites is a test function of that file, and no
source file or page names a .md document that is not there."""
import ast
import re
from pathlib import Path

import pytest

from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCES = [*sorted(REPO.glob("*.py")), *sorted((REPO / "models").glob("*.py")), *sorted((REPO / "tests").glob("*.py"))]

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
TEST_REFERENCE = re.compile(r"tests/(test_\w+\.py)(?:::(\w+))?")
DOCUMENT_NAME = re.compile(r"[\w./-]*\w\.md\b")


def prose(page):
    """The page's text outside fenced code blocks, where a '#' line is a comment, not a heading."""
    return FENCE.sub("", page.read_text())


def anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces as
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page):
    """Every anchor of page, a repeated heading's later ones with GitHub's -1, -2, ... suffixes."""
    seen, result = {}, set()
    for heading in HEADING.findall(prose(page)):
        base = anchor(heading)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


def relative_links(page):
    return [target for target in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_names_an_existing_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert broken == [], f"{page.name}: " + "; ".join(broken)


def functions_of(path):
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_cited_test_exists(page):
    missing = []
    for file_name, function in TEST_REFERENCE.findall(page.read_text()):
        path = REPO / "tests" / file_name
        if not path.is_file():
            missing.append(f"tests/{file_name}")
        elif function and function not in functions_of(path):
            missing.append(f"tests/{file_name}::{function}")
    assert missing == [], f"{page.name} cites " + ", ".join(missing)


def test_no_file_names_a_document_that_does_not_exist():
    """A .md name counts as found relative to the naming file's folder or to the repository root."""
    missing = [f"{source.relative_to(REPO)}: {name}" for source in PAGES + SOURCES
               for name in sorted(set(DOCUMENT_NAME.findall(source.read_text())))
               if not ((source.parent / name).exists() or (REPO / name).exists())]
    assert missing == []


def test_the_checks_see_what_they_check():
    """The patterns above find what the pages hold, so that an empty finding means a clean page."""
    readme = REPO / "README.md"
    assert "docs/safety.md" in relative_links(readme)
    assert {"the-two-commands", "training-on-coco"} <= anchors(readme)
    assert anchor("Where the time goes: torch.profiler") == "where-the-time-goes-torchprofiler"
    assert anchor("Evaluating your own `Dataset` class") == "evaluating-your-own-dataset-class"
    assert len(TEST_REFERENCE.findall((REPO / "docs/safety.md").read_text())) >= 20
    assert "test_every_cited_test_exists" in functions_of(Path(__file__))
