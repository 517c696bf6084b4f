"""The environment's two slow steps, on every core (the Makefile's setup targets).

``install.py lock LOCK REQUIREMENTS...``
    Install every package LOCK pins (``name==version`` lines, written by ``make lock``)
    with ``--no-deps`` by ``PIP_JOBS`` pip processes at once (default: two per core), a
    share of the lock each (interleaved, so that no share holds all the big wheels). pip
    spends an install reading each package's index pages (waiting on the index) and
    unpacking its wheel on one core: 52 s for the 170 packages of requirements.lock, 36-43 s
    as two processes, 34-36 s as four on two cores (three runs each). ``pip check`` then proves
    the environment complete; when a pip fails or a dependency is missing (a lock written
    on another platform) pip's resolver installs REQUIREMENTS instead.

``install.py compile SITE_PACKAGES EXCLUDE_REGEX``
    Byte-compile SITE_PACKAGES as one ``compileall -i -`` process per core, each given a
    share of the files. ``compileall -j 0`` dispatches one file per task to its workers:
    8 s for a tree that is already compiled, where one process takes 0.9 s.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PIP = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]


def shares(items: list[str], n: int) -> list[list[str]]:
    """``items`` dealt round-robin into at most ``n`` non-empty shares."""
    return [share for share in (items[k::n] for k in range(max(1, n))) if share]


def run_all(commands: list[tuple[list[str], str | None]]) -> bool:
    """Run every ``(argv, stdin text)`` at once; True when all exit 0."""
    procs = [(subprocess.Popen(argv, stdin=subprocess.PIPE if text is not None else None, text=True), text)
             for argv, text in commands]
    for proc, text in procs:
        if text is not None:
            proc.stdin.write(text)
            proc.stdin.close()
    return all(proc.wait() == 0 for proc, _ in procs)


def install_lock(lock: Path, requirements: list[str]) -> int:
    pins = [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")]
    jobs = int(os.environ.get("PIP_JOBS") or 2 * (os.cpu_count() or 1))
    ok = run_all([(PIP + ["--no-deps", *share], None) for share in shares(pins, jobs)])
    if ok:
        check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
        if check.returncode == 0:
            return 0
        why = check.stdout.strip().splitlines()[0] if check.stdout.strip() else "pip check failed"
    else:
        why = "a pip process failed"
    print(f"{lock} does not fit this platform ({why}): resolving {' '.join(requirements)} instead", file=sys.stderr)
    return subprocess.run(PIP + [arg for req in requirements for arg in ("-r", req)]).returncode


def compile_tree(site: Path, exclude: str) -> int:
    skip = re.compile(exclude)
    files = sorted(str(p) for p in site.rglob("*.py") if not skip.search(str(p)))
    jobs = os.cpu_count() or 1
    ok = run_all([([sys.executable, "-m", "compileall", "-qq", "-i", "-"], "\n".join(share) + "\n")
                  for share in shares(files, jobs)])
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "lock":
        return install_lock(Path(argv[1]), argv[2:])
    if len(argv) == 3 and argv[0] == "compile":
        return compile_tree(Path(argv[1]), argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
