"""The locks the Makefile installs from (requirements.lock, requirements-test.lock) against
the requirements files people edit: a pin changed in a requirements file but not in its
lock would install the old version silently (the lock is installed with --no-deps)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of - _ . do not matter; extras are dropped."""
    return re.sub(r"[-_.]+", "-", name.split("[")[0].strip()).lower()


def pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of ``path``."""
    out: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"{path.name}:{number}: {raw!r} is not pinned with =="
        key = canonical(name)
        assert key not in out, f"{path.name}:{number}: {name} is listed twice"
        out[key] = version.strip()
    return out


@pytest.mark.parametrize("requirements, locks", [
    (["requirements.txt"], ["requirements.lock"]),
    (["requirements-test.txt"], ["requirements.lock", "requirements-test.lock"]),
])
def test_every_pin_is_in_its_lock_at_the_same_version(requirements, locks):
    locked: dict[str, str] = {}
    for lock in locks:
        for name, version in pins(ROOT / lock).items():
            assert name not in locked, f"{name} is in more than one of {locks}"
            locked[name] = version
    for req in requirements:
        for name, version in pins(ROOT / req).items():
            assert name in locked, f"{req} pins {name}=={version}, which {' / '.join(locks)} lack: run `make lock`"
            assert locked[name] == version, (
                f"{req} pins {name}=={version} but {' / '.join(locks)} hold {locked[name]}: run `make lock`")


def test_torch_is_locked_without_a_local_version_label():
    # ==2.13.0 matches the on-disk CPU build (2.13.0+cpu) and exists on any index
    assert pins(ROOT / "requirements.lock")["torch"] == "2.13.0"
    assert not [line for line in (ROOT / "requirements.lock").read_text().splitlines() if "+" in line.split("#")[0]]


def test_the_lock_holds_what_the_installed_environment_holds():
    """The environment this test runs in was installed from the locks (make setup, make
    test): each locked package is installed at its locked version."""
    from importlib import metadata

    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    for lock in ("requirements.lock", "requirements-test.lock"):
        for name, version in pins(ROOT / lock).items():
            assert name in installed, f"{lock}: {name} is not installed"
            assert installed[name].split("+")[0] == version, f"{lock}: {name} {installed[name]} installed, {version} locked"
