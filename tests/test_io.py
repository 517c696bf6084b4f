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
