"""The documentation's relative links and images point at files of this checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
#: ``[text](target)`` and ``![alt](target)``; the target up to whitespace or ``)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_targets(page: Path) -> list[str]:
    """The page's link targets that are paths in the repository (no URL, no in-page anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [
        target
        for target in relative_targets(page)
        if not (page.parent / target.partition("#")[0]).exists()
    ]
    assert not missing, f"{page.relative_to(ROOT)} links to missing paths: {missing}"


def test_readme_links_the_moved_pages() -> None:
    targets = set(relative_targets(ROOT / "README.md"))
    expected = {"docs/study.md", "docs/guarantees.md", "docs/performance.md", "docs/design.md"}
    assert expected | {"lightning_kfac/mixup/__init__.py"} <= targets


def test_readme_images_render_on_a_package_index() -> None:
    """A package index shows the README without the repository: its images are absolute URLs,
    on the repository named in pyproject.toml, of files in this checkout."""
    import tomllib

    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"][
        "Repository"
    ]
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert images
    for image in images:
        assert image.startswith(raw), image
        assert (ROOT / image.removeprefix(raw)).is_file(), image
