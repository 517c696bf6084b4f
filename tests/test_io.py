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


@pytest.mark.parametrize("kernel, user, attr, unversioned", [
    ("attnlab.explain._fused", "attnlab.explain.rollout", "head_sum", "1"),   # before VERSION existed
    ("attnlab._vocab", "attnlab.aggregate", "histogram_pairs", "None"),
])
def test_a_kernel_built_from_an_older_source_is_refused_with_a_warning(kernel, user, attr, unversioned):
    """An editable install keeps the .so of its last build after a pull that changed the
    kernel's .c file: the module using it (``compiled_kernel``) then warns and takes
    torch's path instead of trusting it; the kernel built here is the version it expects."""
    import importlib
    import subprocess
    import sys

    code = ("import sys, types, warnings\n"
            f"old = types.ModuleType({kernel!r}); old.{attr} = None\n"
            f"sys.modules[{kernel!r}] = old\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            f"    import {user}\n"
            f"m = sys.modules[{user!r}]\n"
            f"print(m.{kernel.rpartition('.')[2]} is None, "
            "[str(w.message) for w in seen if w.category is RuntimeWarning])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    source = kernel.rpartition(".")[2] + ".c"
    assert out.startswith(f"True [\"{kernel} was built from an older {source} (version {unversioned}, "
                          "expected 2)"), out
    assert "rebuild it with `pip install -e .`" in out
    module = importlib.import_module(user)
    built = getattr(module, kernel.rpartition(".")[2])
    if built is not None:
        assert built.VERSION == module.KERNEL_VERSION
