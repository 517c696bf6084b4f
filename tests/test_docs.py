"""The documentation: the site builds with `mkdocs build --strict` (every link, picture and
API name resolves) and loads nothing from the internet; every code block a page marks as
runnable runs as written (tests/docblocks.py); the README stays a five-minute read."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import docblocks

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BLOCKS = docblocks.runnable()


class _Loads(HTMLParser):
    """What a page loads: script src, link href (stylesheets, icons, preloads), img src,
    iframe src, and url(...) in inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video") and a.get("src"):
            self.loaded.append(a["src"])
        if tag == "link" and a.get("href") and a.get("rel") not in ("canonical",):
            self.loaded.append(a["href"])
        if a.get("style"):
            self.loaded += re.findall(r"url\(['\"]?([^'\")]+)", a["style"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_site_builds_strictly_with_every_page_and_the_api(site):
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(nav))
    pages_on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert listed == {p for p in pages_on_disk if not p.startswith("snippets/")}   # snippets: included, not pages
    for page in listed:
        assert (site / page.replace(".md", ".html")).is_file(), page
    api = (site / "api.html").read_text()
    import attnlab
    for name in attnlab.__all__:                  # every public name has its generated entry
        assert f'id="attnlab.{name}"' in api, name


def test_site_loads_nothing_from_the_internet(site):
    """No web font, script or stylesheet from another host: the pages open offline (links
    to other sites in the text are fine, they load nothing)."""
    html_files = sorted(site.rglob("*.html"))
    assert html_files
    for path in html_files:
        parser = _Loads()
        parser.feed(path.read_text(encoding="utf-8"))
        remote = [u for u in parser.loaded if re.match(r"(https?:)?//", u)]
        assert remote == [], f"{path.relative_to(site)} loads {remote}"
    for css in site.rglob("*.css"):
        assert not re.search(r"@import\s+url\(['\"]?https?:|fonts\.googleapis", css.read_text(errors="replace")), css


def test_every_picture_is_there_and_comes_from_screenshots():
    """Every picture the README and the pages show exists and is one that `make screenshots`
    takes from a real run (scripts/screenshots.py saves it)."""
    taken = set(re.findall(r'"(\w+\.png)"', (ROOT / "scripts" / "screenshots.py").read_text()))
    for page in docblocks.pages():
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.name}: {target}"
            assert path.name in taken, f"{page.name}: {target} is not taken by scripts/screenshots.py"


def test_readme_is_a_five_minute_read_and_links_to_existing_pages():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 150, len(lines)
    assert max(map(len, lines)) <= 300
    assert "make run" in readme and "make test" in readme
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link


def test_every_marked_block_is_run_by_a_test():
    """A block that says `in tests/<file>` is fetched there by its name."""
    assert BLOCKS, "no page marks a runnable block"
    for b in BLOCKS:
        if b.test:
            text = (ROOT / b.test).read_text()
            assert f'"{b.name}"' in text, f"{b} says it runs in {b.test}, which never names it"


@pytest.mark.parametrize("b", [b for b in BLOCKS if not b.test], ids=lambda b: b.name)
def test_marked_block_runs_as_written(b, tmp_path):
    """Each marked block on its own (docblocks.run: python in a fresh interpreter, bash
    with `bash -e`)."""
    if "transformers" in b.code:
        pytest.importorskip("transformers", reason="transformers (requirements-test.txt) is not installed")
    docblocks.run(b, tmp_path)
