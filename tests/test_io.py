"""Stage outputs appear whole or not at all."""
import pytest

from attnlab.io import atomic_dir


def test_atomic_dir_replaces_on_success(tmp_path):
    target = tmp_path / "data" / "motion" / "train"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as out:
        assert out != target and out.parent == target.parent
        (out / "new.txt").write_text("new")
        assert (target / "old.txt").exists()           # untouched until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["train"]


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "train"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as out:
            (out / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_removes_what_killed_writers_left(tmp_path):
    """A writer killed with SIGKILL leaves its temporary directory `.<name>.<pid>.<random>`;
    the next writer removes it, but not one whose process still runs."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getppid()
    (tmp_path / f".train.{dead}.abc123").mkdir()
    (tmp_path / f".train.{dead}.abc123" / "model.pt").write_text("half")
    (tmp_path / f".train.{alive}.def456").mkdir()
    (tmp_path / f".prepare.{dead}.ghi789").mkdir()                 # another stage's: not this writer's business
    with atomic_dir(tmp_path / "train") as out:
        (out / "model.pt").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".prepare.{dead}.ghi789", f".train.{alive}.def456", "train"]
