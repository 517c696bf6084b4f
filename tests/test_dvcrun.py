"""attnlab.dvcrun: DVC's command line writing a stage's dvc.lock entry in place of the
whole file must give exactly the bytes DVC's own writer gives (DVC's round-trip parse,
``data["stages"].update(entry)``, DVC's dump), and hand anything else to DVC."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dvc")
from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml, parse_yaml_for_update  # noqa: E402

from attnlab.dvcrun import blocks, entry, install, splice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCK = (ROOT / "dvc.lock").read_text()


def dvc_writes(text: str, entries: list[dict]) -> str:
    """What DVC's Lockfile.dump_stages writes: the whole file, re-parsed and dumped."""
    data = parse_yaml_for_update(text, "dvc.lock")
    for stage_data in entries:
        data["stages"].update(stage_data)
    return dumps_yaml(data)


def stage(name: str) -> dict:
    return {name: copy.deepcopy(parse_yaml(LOCK, "dvc.lock")["stages"][name])}


def changed(name: str) -> dict:
    """A real entry with what a re-run changes: hashes, sizes, a dep more and one less,
    params of every scalar kind, a command long enough to be folded."""
    data = stage(name)
    body = data[name]
    body["deps"][0]["md5"] = "0" * 32
    body["deps"][0]["size"] += 17
    body["deps"].pop()
    body["deps"].append({"path": "src/attnlab/new module.py", "hash": "md5", "md5": "f" * 32, "size": 1})
    body["params"] = {"params.yaml": {"x.lr": 1e-05, "x.none": None, "x.flag": True, "x.word": "yes",
                                      "x.version": "0.10", "x.colon": "a: b", "x.text": "é ü – ∑",
                                      "x.list": [1, 2.5, "three"], "x.empty": {}}}
    body["cmd"] = "python stages/train.py " + " ".join(f"--option-{i} value-{i}" for i in range(12))
    return data


def test_a_changed_entry_is_written_as_dvc_writes_it():
    names = list(parse_yaml(LOCK, "dvc.lock")["stages"])
    for name in (names[0], names[len(names) // 2], names[-1]):
        new, modified = splice(LOCK, [entry(changed(name))])
        assert modified
        assert new == dvc_writes(LOCK, [changed(name)]), name


def test_an_unchanged_entry_leaves_the_file_as_it_was():
    name = list(parse_yaml(LOCK, "dvc.lock")["stages"])[3]
    assert splice(LOCK, [entry(stage(name))]) == (LOCK, False)
    assert dvc_writes(LOCK, [stage(name)]) == LOCK


def test_new_stages_are_appended_as_dvc_appends_them():
    names = list(parse_yaml(LOCK, "dvc.lock")["stages"])
    new_a = {"train@new": changed(names[1])[names[1]]}
    new_b = {"report@new": stage(names[-1])[names[-1]]}
    ours, modified = splice(LOCK, [entry(new_a), entry(changed(names[2])), entry(new_b)])
    assert modified
    assert ours == dvc_writes(LOCK, [new_a, changed(names[2]), new_b])


@pytest.mark.parametrize("text", [
    "",                                                            # no lock yet
    "schema: '3.0'\nstages:\n  a:\n    cmd: x\n",                  # another schema
    "schema: '2.0'\nstages:\n  a:\n    cmd: x\ndatasets:\n- name: d\n",   # top-level key after stages
    "schema: '2.0'\nstages:\n  # a comment\n  a:\n    cmd: x\n",   # a line DVC does not write
    "schema: '2.0'\nstages:\n   a:\n    cmd: x\n",                 # an indent DVC does not write
    "schema: '2.0'\nstages:\n  a:\n    cmd: x",                    # no final newline
    "schema: '2.0'\nstages:\n    cmd: x\n",                        # no stage key
])
def test_a_file_not_as_dvc_writes_it_is_left_to_dvc(text):
    assert blocks(text) is None
    assert splice(text, [entry({"a": {"cmd": "y"}})]) is None


def test_a_key_found_twice_is_left_to_dvc():
    text = "schema: '2.0'\nstages:\n  a:\n    cmd: x\n  a:\n    cmd: z\n"
    assert blocks(text) == ["  a:\n    cmd: x\n", "  a:\n    cmd: z\n"]
    assert splice(text, [entry({"a": {"cmd": "y"}})]) is None


def test_a_dvc_without_what_it_replaces_runs_unchanged(monkeypatch, capsys):
    from dvc.dvcfile import Lockfile
    from dvc.stage import serialize

    before = Lockfile.dump_stages
    monkeypatch.delattr(serialize, "to_lockfile")
    assert install() is False
    assert "attnlab.dvcrun: dvc.lock is written by DVC's own code" in capsys.readouterr().err
    assert Lockfile.dump_stages is before


def test_repro_through_dvcrun_writes_the_lock_dvc_writes(tmp_path):
    """A two-stage project reproduced by ``python -m attnlab.dvcrun repro`` and by plain
    ``dvc repro`` (first run: DVC's own writer makes the file; then changed deps and a new
    stage through the splice): the same dvc.lock each time, and plain DVC finds it up to date."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    (tmp_path / "params.yaml").write_text("items: [a, b]\nscale: 2\n")
    (tmp_path / "in.txt").write_text("one\n")
    stages = ("stages:\n  copy:\n    foreach: ${items}\n    do:\n"
              "      cmd: python -c \"open('out-${item}.txt','w').write(open('in.txt').read()*${scale})\"\n"
              "      deps:\n        - in.txt\n      params:\n        - scale\n      outs:\n        - out-${item}.txt\n")
    (tmp_path / "dvc.yaml").write_text(stages)
    dvcrun = (sys.executable, "-m", "attnlab.dvcrun")

    def both(*args):
        """The lock after dvcrun (spliced, but the first entry of a new lock), then after
        plain dvc from the same start; both equal."""
        start = (tmp_path / "dvc.lock").read_text() if (tmp_path / "dvc.lock").exists() else None
        out = run(*dvcrun, "repro", "-v", *args)
        assert "entries spliced into 'dvc.lock'" in out, out
        ours = (tmp_path / "dvc.lock").read_text()
        if start is None:
            (tmp_path / "dvc.lock").unlink()
        else:
            (tmp_path / "dvc.lock").write_text(start)
        run("dvc", "repro", *args)
        assert ours == (tmp_path / "dvc.lock").read_text()
        assert "up to date" in run("dvc", "status")
        return out

    both()                                                    # no lock yet: DVC's writer
    (tmp_path / "in.txt").write_text("two\n")
    assert "Updating lock file 'dvc.lock'" in both()          # every entry changes
    (tmp_path / "params.yaml").write_text("items: [a, b, c]\nscale: 3\n")
    both()                                                    # changes and a new stage
    assert "Updating lock file" not in both("--force", "copy@b")   # re-run, nothing changed
