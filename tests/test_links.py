"""Every relative link and image in the README, the docs and the notebooks resolves (a moved file
or a renamed heading breaks a reader's path through the kit), and every page can be reached from the
README."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")
FENCE = re.compile(r"```.*?```", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", FENCE.sub("", markdown), re.M)}


def broken_links(markdown: str, folder: Path) -> list[str]:
    broken = []
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#") and not target[1:]:
            continue  # a web address, or an empty anchor
        path, _, anchor = target.partition("#")
        file = (folder / path).resolve() if path else None
        if file is not None and not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file is None or file.suffix == ".md") and anchor not in anchors(
                file.read_text() if file is not None else markdown):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_the_pages_resolves(page):
    assert broken_links(page.read_text(), page.parent) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_relative_link_in_the_notebooks_resolves(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert broken_links(text, path.parent) == []


def linked_pages(markdown: str, folder: Path) -> set[Path]:
    """The Markdown files a page links to (existing ones; `broken_links` reports the others)."""
    found = set()
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = (match.group(1) or match.group(2)).partition("#")[0]
        if target.endswith(".md") and not re.match(r"[a-z]+:", target) and (folder / target).exists():
            found.add((folder / target).resolve())
    return found


def test_the_pages_cover_the_front_door_and_every_docs_page():
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "notebooks/README.md", "docs/teaching.md", "docs/results.md", "docs/choices.md",
            "docs/data.md", "docs/runs.md", "docs/performance.md", "docs/citing.md",
            "docs/contributing.md"} <= names
    assert names >= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}


def test_every_page_is_reachable_from_the_readme():
    seen, todo = set(), [(ROOT / "README.md").resolve()]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        todo.extend(linked_pages(page.read_text(), page.parent) - seen)
    assert [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in seen] == []


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = "[ok](there.md#a-heading) [gone](missing.png) ![img](there.md) [bad](there.md#nope) [web](https://x.org)"
    assert broken_links(page, tmp_path) == ["missing.png: no such file", "there.md#nope: no such heading"]
