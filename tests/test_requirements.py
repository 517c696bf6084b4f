"""The locks the Makefile installs from (requirements.lock, requirements-test.lock) against
the requirements files people edit: a pin changed in a requirements file but not in its
lock would install the old version silently (the lock is installed with --no-deps)."""
from __future__ import annotations

import re
import sys
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


def _install_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("attnlab_install_script", ROOT / "scripts" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_is_dealt_to_the_pips_and_a_failure_falls_back_to_the_resolver(tmp_path, monkeypatch):
    install = _install_script()
    assert install.shares(list("abcdefg"), 3) == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert install.shares(["a"], 4) == [["a"]]
    log = tmp_path / "calls.txt"
    fake_pip = tmp_path / "fake_pip.py"          # records its arguments; fails for the pin bad==1
    fake_pip.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n"
                        "sys.exit(1 if 'bad==1' in sys.argv else 0)\n")
    monkeypatch.setattr(install, "PIP", [sys.executable, str(fake_pip), str(log)])
    monkeypatch.setenv("PIP_JOBS", "2")
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nalpha==1\nbad==1\n\ngamma==2\n")
    assert install.install_lock(lock, ["req-a.txt", "req-b.txt"]) == 0
    calls = sorted(log.read_text().splitlines())
    assert calls == ["--no-deps alpha==1 gamma==2", "--no-deps bad==1", "-r req-a.txt -r req-b.txt"]


def test_compile_skips_the_excluded_files_and_compiles_the_others(tmp_path):
    install = _install_script()
    import importlib.util

    files = [tmp_path / "pkg" / f"m{i}.py" for i in range(5)] + [tmp_path / "pkg" / "tests" / "t.py"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("X = 1\n")
    assert install.compile_tree(tmp_path, r"/tests/") == 0
    compiled = [f.name for f in files if Path(importlib.util.cache_from_source(str(f))).exists()]
    assert compiled == [f"m{i}.py" for i in range(5)]
