"""The stage runner and the stage bodies without DVC: a tiny experiment through every stage
but track, what each stage leaves, and the timing records the track stage reads."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from attnlab.layout import STAGES, Layout
from attnlab.pipeline import stage_records, stage_times
from attnlab.pipeline.timing import outputs_digest
from helpers import ROOT, run_stages, tiny_params, write_params

UNTRACKED = [s for s in STAGES if s != "track"]


@pytest.fixture(scope="module")
def tokens_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    params = write_params(root / "params.yaml", tiny_params(["tokens"]))
    run_stages(UNTRACKED, "tokens", params, root / "data")
    return root, Layout(root / "data" / "tokens")


def test_every_stage_writes_its_directory_and_nothing_else(tokens_run):
    root, lay = tokens_run
    assert sorted(p.name for p in lay.root.iterdir()) == sorted([*UNTRACKED, ".timings"])
    for name in ("dataset", "meta", "model", "history", "attention", "aggregate_summary", "importance", "metrics",
                 "report"):
        assert getattr(lay, name).is_file(), name
    explained = np.load(lay.importance)
    methods = json.loads((lay.metrics).read_text())["faithfulness"]["deletion_auc"]
    assert set(methods) == set(tiny_params(["tokens"])["tokens"]["explain"]["methods"]) | {"random"}
    for m in set(methods) - {"random"}:                 # rows sum to 1 (or are all 0: no relevance at all)
        sums = explained[m].sum(1)
        assert np.all(np.isclose(sums, 1.0, rtol=1e-4) | (np.abs(explained[m]).sum(1) == 0)), (m, sums)
        assert explained[m].shape == (len(explained["target"]), explained[m].shape[1])
    assert not list(lay.root.glob(".*.*"))                                      # no temporary directory left


def test_each_stage_records_when_it_ran_and_what_it_wrote(tokens_run):
    _, lay = tokens_run
    records = stage_records(lay, UNTRACKED)
    assert all(r is not None for r in records.values()), records
    previous_end = 0
    for stage in UNTRACKED:                       # in order, one after the other
        r = records[stage]
        assert previous_end <= r["start_ms"] <= r["end_ms"]
        previous_end = r["end_ms"]
        # the digest: sha256 over (relative path, NUL, content) of every file, sorted by path
        h = hashlib.sha256()
        for path in sorted(p for p in lay.dir(stage).rglob("*") if p.is_file()):
            h.update(path.relative_to(lay.dir(stage)).as_posix().encode() + b"\0" + path.read_bytes())
        assert r["outputs_sha256"] == h.hexdigest() == outputs_digest(lay.dir(stage))
    start, end, unknown = stage_times(records)
    assert (start, end, unknown) == (records["prepare"]["start_ms"], records["report"]["end_ms"], [])


def test_a_changed_output_makes_its_time_unknown(tokens_run, tmp_path):
    import shutil

    _, lay = tokens_run
    copy = Layout(tmp_path / "tokens")
    shutil.copytree(lay.root, copy.root)
    (copy.dir("report") / "report.html").write_text("changed")
    records = stage_records(copy, UNTRACKED)
    assert records["report"] is None and all(records[s] is not None for s in UNTRACKED if s != "report")
    assert stage_times(records)[2] == ["report"]


def test_the_stage_bodies_are_one_table_and_the_old_module_warns():
    import importlib
    import sys

    from attnlab.pipeline import STAGE_FUNCTIONS, stages

    assert list(STAGE_FUNCTIONS) == list(STAGES)
    assert all(STAGE_FUNCTIONS[s] is getattr(stages, s) for s in STAGES)
    sys.modules.pop("attnlab.workflow", None)
    with pytest.warns(DeprecationWarning, match="attnlab.pipeline.stages"):
        workflow = importlib.import_module("attnlab.workflow")
    assert workflow.STAGE_FUNCTIONS is STAGE_FUNCTIONS
    from attnlab.evaluate.summaries import write_curves
    assert workflow.write_curves is write_curves            # moved below the pipeline, old name kept


def test_stage_rejects_an_unknown_stage_before_anything():
    from attnlab.pipeline import run

    with pytest.raises(ValueError, match="unknown stage 'trian'; stages: prepare, train"):
        run("trian", ["tokens"])


def test_exit_now_does_what_exit_does_that_matters(tmp_path):
    """A stage script ends with exit_now: a thread that is not a daemon finishes, the atexit
    handlers run (a tracer's trace, MLflow's), buffered stdout and stderr arrive, the status
    is kept — checked against a plain interpreter exit of the same script."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open(sys.argv[1] + '.thread', 'w').write('finished')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: open(sys.argv[1] + '.atexit', 'w').write('ran'))\n"
        "sys.stdout.write('buffered out')\n"
        "sys.stderr.write('buffered err')\n"
        "if sys.argv[2] == 'fast':\n"
        "    from attnlab.io import exit_now\n"
        "    exit_now(3)\n"
        "sys.exit(3)\n")
    outcome = {}
    for how in ("plain", "fast"):
        base = tmp_path / how
        done = subprocess.run([sys.executable, str(script), str(base), how], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        outcome[how] = (done.returncode, done.stdout, done.stderr,
                        (tmp_path / f"{how}.thread").read_text(), (tmp_path / f"{how}.atexit").read_text())
    assert outcome["fast"] == outcome["plain"] == (3, "buffered out", "buffered err", "finished", "ran")


def test_stages_without_a_model_never_import_torch(tmp_path):
    """Prepare of motion (sktime's BasicMotions) and aggregate of an experiment without a
    vocabulary run as scripts, the way DVC runs them, without importing torch (about 1.2 s
    of every such stage); their timing records then carry no thread count. Checked from an
    atexit handler of the stage process itself (exit_now runs them)."""
    import os
    import subprocess
    import sys

    params = write_params(tmp_path / "params.yaml", tiny_params(["motion"]))
    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "ATTNLAB_LIVE": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for stage in ("prepare", "aggregate"):
        done = subprocess.run([sys.executable, "-c", probe, str(ROOT / "stages" / f"{stage}.py"), "motion",
                               "--params", str(params), "--data", str(tmp_path / "data")],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("torch imported: False"), (stage, done.stdout)
        record = json.loads((tmp_path / "data" / "motion" / ".timings" / f"{stage}.json").read_text())
        assert "threads" not in record and record["processes"] == 1
    summary = json.loads((tmp_path / "data" / "motion" / "aggregate" / "summary.json").read_text())
    assert summary["vocabulary"] is False
