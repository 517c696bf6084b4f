"""The code blocks the documentation marks as runnable, found and run in one place.

A page (README.md or any page under docs/) marks a fenced block as runnable with an HTML
comment on the line right before its opening fence (invisible on GitHub and in the site):

    <!-- run: library-recorder -->
    ```python
    ...
    ```

``name`` is unique over all pages. tests/test_docs.py runs every marked block (python:
executed in a fresh namespace; bash: ``bash -e`` in a temporary directory whose ``.venv``
is this environment). A block that needs a project around it or takes long says which
test runs it instead, ``<!-- run: own-model-pipeline, in tests/test_external_kind.py -->``;
that test fetches it with :func:`block` and test_docs checks that the test names it.
Tests that check a block's numbers (against a dense construction, a closed form) take
its namespace from :func:`run_python`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*run:\s*(?P<name>[\w.-]+)\s*(?:,\s*in\s+(?P<test>\S+?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    """One runnable block: where it is (``page``, 1-based ``line`` of its first code
    line), its ``lang`` (python, bash), its ``code`` and the test that runs it when not
    test_docs (``test``, a path relative to the project)."""

    name: str
    page: str
    line: int
    lang: str
    code: str
    test: str | None = None

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.name})"


def pages() -> list[Path]:
    """README.md and every Markdown page of the documentation site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    """The marked blocks of one page, in order; a marker not followed by a fenced block,
    or a block left open, is an error naming the page and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    found, i = [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i].strip())
        if not marker:
            i += 1
            continue
        fence = FENCE.match(lines[i + 1].strip()) if i + 1 < len(lines) else None
        if not fence or not fence["lang"]:
            raise ValueError(f"{page}:{i + 1}: '{lines[i].strip()}' must be followed by a fenced block with a "
                             "language (```python or ```bash)")
        indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == fence["fence"]), None)
        if end is None:
            raise ValueError(f"{page}:{i + 2}: the block of {marker['name']!r} is never closed")
        code = "\n".join(line[indent:] for line in lines[i + 2:end]) + "\n"
        found.append(Block(marker["name"], page, i + 3, fence["lang"], code, marker["test"]))
        i = end + 1
    return found


def runnable() -> list[Block]:
    """Every marked block of every page; names are unique."""
    found = [b for path in pages() for b in blocks_of(path)]
    seen: dict[str, Block] = {}
    for b in found:
        if b.name in seen:
            raise ValueError(f"{b}: the name {b.name!r} is already used at {seen[b.name]}")
        seen[b.name] = b
    return found


def block(name: str) -> Block:
    """The marked block called ``name`` (KeyError naming the known names otherwise)."""
    for b in runnable():
        if b.name == name:
            return b
    raise KeyError(f"no block marked '<!-- run: {name} -->'; known: {', '.join(b.name for b in runnable())}")


def run_python(b: Block | str, namespace: dict | None = None) -> dict:
    """Execute a python block as written, in ``namespace`` (a fresh one by default);
    tracebacks point at the page and line. Returns the namespace."""
    b = block(b) if isinstance(b, str) else b
    assert b.lang == "python", f"{b} is a {b.lang} block"
    namespace = {"__name__": f"docblock_{b.name.replace('-', '_')}"} if namespace is None else namespace
    exec(compile("\n" * (b.line - 1) + b.code, b.page, "exec"), namespace)
    return namespace


def run_bash(b: Block | str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a bash block as written (``bash -e``) in ``cwd``, giving ``cwd`` a ``.venv`` that
    is this environment when it has none (blocks start with ``. .venv/bin/activate``).
    Fails with the block's output when it exits non-zero."""
    b = block(b) if isinstance(b, str) else b
    assert b.lang in ("bash", "sh", "shell"), f"{b} is a {b.lang} block"
    venv = Path(cwd) / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.executable).parent.parent)
    env = dict(os.environ if env is None else env)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    proc = subprocess.run(["bash", "-e", "-c", b.code], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{b} exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def run(b: Block | str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a block as written, on its own: python in a fresh interpreter (a block that, say,
    registers a method leaves nothing behind in the caller's), bash with :func:`run_bash`.
    The file a python block runs from is ``cwd/<name>.py``, padded so that tracebacks give
    the page's line numbers. Fails with the block's output when it exits non-zero."""
    b = block(b) if isinstance(b, str) else b
    if b.lang != "python":
        return run_bash(b, cwd)
    script = Path(cwd) / f"{b.name}.py"
    script.write_text("\n" * (b.line - 1) + b.code)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{b} exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
