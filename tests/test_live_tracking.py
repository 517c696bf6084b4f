"""Live MLflow runs (issue #30): the pipeline state's run opens when its first stage starts,
training streams per-epoch and system metrics into it while it runs, a stage that fails or
is killed leaves it FAILED (never RUNNING), a re-run resumes it, and a tracking server that
goes down during training costs the training nothing.

Every stage that trains runs as a real process (``python stages/train.py``) on a tiny
``tokens`` project, slowed down per epoch (``ATTNLAB_SLOW_EPOCH``) so that it can be watched
through ``MlflowClient`` while it runs; processes started here are stopped by their ids."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from attnlab import tracking
from helpers import ROOT, run_stages, tiny_params, write_params
from test_server import _healthy, _stop
from test_tracking import _free_port

EXP = "tokens"
BIN = Path(sys.executable).parent


def _params(path: Path, **train) -> Path:
    """A tiny tokens experiment (explain: raw and rollout; no sanity check); ``train`` changes
    make distinct pipeline states."""
    params = tiny_params([EXP], tokens={"train": {"epochs": 6, **train},
                                        "explain": {"methods": ["raw", "rollout"]},
                                        "evaluate": {"resamples": 20, "sanity": {"samples": 0}}})
    return write_params(path, params)


@pytest.fixture(scope="module", autouse=True)
def booting_server(tmp_path_factory):
    """An `mlflow server` (SQLite behind it) started when the module starts, so that it
    boots while the other tests train; stopped by its process group's id."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    proc = _server(port, root, root / "server.log")
    state = {"port": port, "root": root, "proc": proc}
    try:
        yield state
    finally:
        _stop(state["proc"], signal.SIGKILL, group=True)     # a throwaway store: no need to wait


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The stage scripts, a SQLite store, and the prepared data (prepare ran once)."""
    root = tmp_path_factory.mktemp("live")
    shutil.copytree(ROOT / "stages", root / "stages")
    # the code as it is now: the live key hashes the code, which must not change under a test
    shutil.copytree(ROOT / "src" / "attnlab", root / "src" / "attnlab", ignore=shutil.ignore_patterns("__pycache__"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": uri, "ATTNLAB_ROOT": str(root),
           "ATTNLAB_NUM_THREADS": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "ATTNLAB_LIVE_RETRY": "1",
           "PYTHONPATH": str(root / "src")}
    env.pop("ATTNLAB_NPROC", None)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "ATTNLAB_ROOT")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, ATTNLAB_ROOT=str(root))
    try:
        tracking.init_store(uri)
        run_stages(["prepare"], EXP, _params(root / "params.yaml"), root / "prepared")
        yield {"root": root, "uri": uri, "env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _state(project: dict, name: str, **train) -> tuple[Path, Path]:
    """``(params file, data dir)`` of a new pipeline state ``name`` whose prepare is done."""
    root = project["root"]
    params = _params(root / f"{name}.yaml", **train)
    data = root / name
    shutil.copytree(root / "prepared" / EXP / "prepare", data / EXP / "prepare")
    return params, data


def _train(project: dict, params: Path, data: Path, *, slow: float, uri: str | None = None,
           extra: dict | None = None) -> subprocess.Popen:
    env = {**project["env"], "ATTNLAB_SLOW_EPOCH": str(slow), **(extra or {})}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    # Ctrl-C's default: a test run in the background (make test from a script, CI) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt in the stage
    return subprocess.Popen([sys.executable, "stages/train.py", EXP, "--params", str(params), "--data", str(data)],
                            cwd=project["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stages(project: dict, stages: list[str], params: Path, data: Path) -> None:
    """``stages`` one after the other, as the stage scripts run them, in one process."""
    code = ("import sys\nfrom attnlab.pipeline import run\n"
            "for stage in sys.argv[1].split(','):\n"
            "    run(stage, [sys.argv[2], '--params', sys.argv[3], '--data', sys.argv[4]], progress=False)\n")
    done = subprocess.run([sys.executable, "-c", code, ",".join(stages), EXP, str(params), str(data)],
                          cwd=project["root"], env=project["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _inprocess(project: dict, monkeypatch, stages: list[str], params: Path, data: Path) -> None:
    """``stages`` in this process, seeing the code snapshot as their code (the live key)."""
    monkeypatch.chdir(project["root"])
    monkeypatch.setattr(tracking, "code_digest",
                        functools.partial(tracking.code_digest, package=project["root"] / "src" / "attnlab"))
    monkeypatch.delenv("ATTNLAB_SLOW_EPOCH", raising=False)
    run_stages(stages, EXP, params, data)


def _runs(uri: str, status: str | None = None) -> list:
    client = tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXP)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if status is None or r.info.status == status]


def _run_of(uri: str, params: Path) -> list:
    """The runs whose params are those of ``params`` (train.epochs and train.seed identify a state here)."""
    train = yaml.safe_load(params.read_text())[EXP]["train"]
    return [r for r in _runs(uri) if r.data.params.get("train.epochs") == str(train["epochs"])
            and r.data.params.get("train.lr") == str(train["lr"])]


def _epochs(uri: str, run_id: str, key: str = "train_loss") -> list:
    return sorted(tracking.MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _watch(proc: subprocess.Popen, uri: str, params: Path, *, epochs: int, timeout: float = 120) -> tuple[str, int]:
    """Poll the store while ``proc`` trains until its run is RUNNING with >= ``epochs``
    epochs logged: ``(run id, epochs seen)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before {epochs} epochs were seen live:\n{proc.communicate()[1]}"
        for run in _run_of(uri, params):
            seen = len(_epochs(uri, run.info.run_id))
            if run.info.status == "RUNNING" and seen >= epochs:
                return run.info.run_id, seen
        time.sleep(0.3)
    pytest.fail(f"no RUNNING run with {epochs} epochs within {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err
    return err


def _messages(stderr: str) -> list[str]:
    """The lines of stderr that are not tqdm's progress bars."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.match(r"train: +\d+%\|", line)]


# --------------------------------------------------------------------------- opening, resuming, finishing
def test_one_run_per_state_resumed_until_finished(project):
    """The live run's life, through :func:`open_live_run` itself: a state's run is resumed
    by each stage (RUNNING while a stage runs, SCHEDULED between stages, FAILED with its
    error, RUNNING again on a re-run) until track finishes it; then nothing opens it again.
    Another state is another run, and the run it replaces while waiting is KILLED."""
    uri, exp = project["uri"], "unit"
    client = tracking.MlflowClient(uri)

    def opened(key, stage):
        return tracking.open_live_run(exp, key=key, params={"train.lr": 0.1}, stage=stage, start_time=1000)

    live = opened("k1", "train")
    run = client.get_run(live.run_id)
    assert (run.info.status, run.info.start_time, run.data.params) == ("RUNNING", 1000, {"train.lr": "0.1"})
    assert run.data.tags[tracking.RUNNING_TAG] == f"train (pid {os.getpid()})"
    live.log_epoch({"epoch": 1, "train_loss": 0.5})
    live.end_stage()
    assert client.get_run(live.run_id).info.status == "SCHEDULED"
    again = opened("k1", "extract")
    assert again.run_id == live.run_id and client.get_run(live.run_id).info.status == "RUNNING"
    again.fail("DataError: attention.h5 is truncated")
    run = client.get_run(live.run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.ERROR_TAG] == (
        "extract: DataError: attention.h5 is truncated")
    resumed = opened("k1", "extract")
    run = client.get_run(live.run_id)
    assert resumed.run_id == live.run_id and run.info.status == "RUNNING" and tracking.ERROR_TAG not in run.data.tags
    resumed.log_epoch({"epoch": 1, "train_loss": 0.5})         # a step the run holds is not logged twice
    resumed.log_epoch({"epoch": 2, "train_loss": 0.25})
    resumed.finish(end_time=None)
    assert [(m.step, m.value) for m in _epochs(uri, live.run_id)] == [(1, 0.5), (2, 0.25)]
    assert client.get_run(live.run_id).info.status == "FINISHED"
    assert opened("k1", "train") is None                        # an unchanged state is not logged twice

    other = opened("k2", "train")                               # a changed state: a new run
    assert other.run_id != live.run_id
    other.end_stage()
    third = opened("k3", "train")                               # ...which replaces k2's waiting run
    run = client.get_run(other.run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.ERROR_TAG].startswith(
        f"superseded by run {third.run_id}")
    third.fail("KeyboardInterrupt")
    # two runs of one state (two processes opened it at once): the older is kept
    exp_id = client.get_experiment_by_name(exp).experiment_id
    older, newer = (client.create_run(exp_id, start_time=t, tags={tracking.LIVE_TAG: "k4"}).info.run_id
                    for t in (2000, 3000))
    kept = opened("k4", "train")
    assert kept.run_id == older and client.get_run(newer).info.lifecycle_stage == "deleted"
    assert client.get_run(newer).info.status == "KILLED"
    kept.fail("stop")
    # track finds the state's outputs logged by another run (code changed, outputs not): the live run goes
    out = project["root"] / "unit-out.json"
    out.write_text('{"acc": 0.5}')
    logged, created = tracking.log_pipeline_run(exp, params={"train.lr": 0.1}, metrics={"acc": 0.5}, files=[out])
    assert created
    duplicate = opened("k5", "track")
    with duplicate.active():
        assert tracking.log_pipeline_run(exp, params={"train.lr": 0.1}, metrics={"acc": 0.5},
                                         files=[out]) == (logged, False)
    assert client.get_run(duplicate.run_id).info.lifecycle_stage == "deleted"
    assert _runs(uri, "RUNNING") == []


# --------------------------------------------------------------------------- watched while it trains
def test_training_is_watched_live_then_the_last_stage_finishes_the_run(project, monkeypatch):
    uri = project["uri"]
    params, data = _state(project, "live", epochs=12, lr=0.003)
    proc = _train(project, params, data, slow=0.5)
    try:
        run_id, seen = _watch(proc, uri, params, epochs=1)
        assert seen < 12                                        # while it trains, not after
        run = tracking.MlflowClient(uri).get_run(run_id)
        assert run.data.tags[tracking.RUNNING_TAG] == f"train (pid {proc.pid})"
        assert run.data.params["train.epochs"] == "12"         # params logged once, at the start
        _finish(proc)
        finished = time.time()
    finally:
        _stop(proc, signal.SIGKILL)
    client = tracking.MlflowClient(uri)
    between = client.get_run(run_id)
    assert between.info.status == "SCHEDULED"                  # waiting for its next stage
    assert tracking.RUNNING_TAG not in between.data.tags

    monkeypatch.setenv("ATTNLAB_LIVE_AFTER", "0")             # each stage opens the run at once, however quick
    _inprocess(project, monkeypatch, ["extract", "aggregate", "explain", "evaluate", "report", "track"], params, data)
    assert json.loads((data / EXP / "track" / "run.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and [r.info.run_id for r in _run_of(uri, params)] == [run_id]
    # every epoch once, as in history.csv, and logged while training: the timestamps span it
    import pandas as pd

    csv = pd.read_csv(data / EXP / "train" / "history.csv")
    for key in ("train_loss", "test_accuracy"):
        got = _epochs(uri, run_id, key)
        assert [m.step for m in got] == csv["epoch"].tolist()
        assert [m.value for m in got] == pytest.approx(csv[key].tolist(), rel=1e-12)   # the CSV's 17 digits
    stamps = [m.timestamp for m in _epochs(uri, run_id)]
    assert stamps == sorted(stamps) and (stamps[-1] - stamps[0]) / 1000 >= 11 * 0.5 * 0.9
    assert len(set(s // 1000 for s in stamps)) >= 5            # not all in one second
    # system metrics sampled while it trained (every second here), with real values
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    mem = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 3 and len(mem) == len(cpu) and all(m.value > 0 for m in mem)
    assert any(m.value > 0 for m in cpu) and max(m.timestamp for m in cpu) <= finished * 1000
    assert (max(m.timestamp for m in cpu) - min(m.timestamp for m in cpu)) / 1000 >= 2
    # what later stages logged as they finished, and what track added
    assert run.data.metrics["final.test_accuracy"] == pytest.approx(csv["test_accuracy"].iloc[-1])
    assert any(k.startswith("evaluate.faithfulness.deletion_auc.") for k in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"attention", "evaluate", "report", "checkpoint"}
    assert run.data.tags[tracking.LOGGED_TAG + "attention"] == tracking.dir_digest(data / EXP / "extract")
    assert run.data.tags["attnlab.timing.unknown"] == "prepare"     # copied here: no record of when it ran
    assert tracking.ERROR_TAG not in run.data.tags

    # an unchanged state is never logged twice: train again, then track: the same run, untouched
    _inprocess(project, monkeypatch, ["train", "track"], params, data)
    assert [r.info.run_id for r in _run_of(uri, params)] == [run_id]
    assert len(_epochs(uri, run_id)) == 12
    assert _runs(uri, "RUNNING") == []


def test_a_quick_stage_leaves_its_outputs_to_track(project, monkeypatch):
    """Stages quicker than ATTNLAB_LIVE_AFTER never open the run (no MLflow import, no
    queries, the run stays as train left it); track then logs their outputs and evaluate's
    metrics; a bad setting is one error line and exit status 2."""
    uri = project["uri"]
    params, data = _state(project, "quick", epochs=2, lr=0.007)
    _inprocess(project, monkeypatch, ["train"], params, data)
    client = tracking.MlflowClient(uri)
    (run,) = _run_of(uri, params)

    def artifacts() -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id)}

    monkeypatch.setenv("ATTNLAB_LIVE_AFTER", "600")
    _inprocess(project, monkeypatch, ["extract", "aggregate", "explain", "evaluate", "report"], params, data)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "SCHEDULED" and artifacts() == set()          # nothing opened it
    assert not [k for k in after.data.tags if k.startswith(tracking.LOGGED_TAG)]
    assert not [k for k in after.data.metrics if k.startswith("evaluate.")]

    _inprocess(project, monkeypatch, ["track"], params, data)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert artifacts() >= {"attention", "aggregate", "explain", "evaluate", "report", "checkpoint"}
    metrics = json.loads((data / EXP / "evaluate" / "metrics.json").read_text())
    assert after.data.metrics["evaluate.faithfulness.deletion_auc.random"] == pytest.approx(
        metrics["faithfulness"]["deletion_auc"]["random"])

    monkeypatch.setenv("ATTNLAB_LIVE_AFTER", "soon")
    with pytest.raises(SystemExit) as stopped:
        _inprocess(project, monkeypatch, ["report"], params, data)
    assert stopped.value.code == 2


def test_a_stage_that_opens_the_run_reads_no_upstream_output_it_does_not_declare(project, monkeypatch):
    """A stage opening the state's run (here explain, at once: ATTNLAB_LIVE_AFTER=0, after
    train..aggregate ran without live runs) dates the run from prepare's record, hashing
    prepare's outputs to check it -- and no other stage's: external-explain declares none
    of extract's, and once read them this way when load made it run past the delay."""
    import attnlab.pipeline.timing as timing

    uri = project["uri"]
    params, data = _state(project, "opener", epochs=2, lr=0.011)
    monkeypatch.setenv("ATTNLAB_LIVE", "0")
    _inprocess(project, monkeypatch, ["train", "extract", "aggregate"], params, data)
    assert _run_of(uri, params) == []
    hashed = []
    digest = timing.outputs_digest
    monkeypatch.setattr(timing, "outputs_digest", lambda directory: hashed.append(Path(directory).name) or digest(directory))
    monkeypatch.setenv("ATTNLAB_LIVE", "1")
    monkeypatch.setenv("ATTNLAB_LIVE_AFTER", "0")
    _inprocess(project, monkeypatch, ["explain"], params, data)
    (run,) = _run_of(uri, params)
    assert set(hashed) <= {"prepare", "explain"}, hashed        # explain: its own timing record
    assert "explain" in {a.path for a in tracking.MlflowClient(uri).list_artifacts(run.info.run_id)}


# --------------------------------------------------------------------------- failures
def test_killed_and_interrupted_stages_leave_their_runs_failed_and_a_rerun_resumes(project, monkeypatch):
    uri = project["uri"]
    killed_params, killed_data = _state(project, "killed", epochs=10, lr=0.004)
    stopped_params, stopped_data = _state(project, "interrupted", epochs=40, lr=0.005)
    # slow epochs (>= 1 s): neither training may end before its signal, even on a loaded machine
    killed = _train(project, killed_params, killed_data, slow=1.0)
    stopped = _train(project, stopped_params, stopped_data, slow=1.0)
    try:
        killed_id, _ = _watch(killed, uri, killed_params, epochs=2)
        os.kill(killed.pid, signal.SIGKILL)                   # nothing runs in the stage after this
        stopped_id, _ = _watch(stopped, uri, stopped_params, epochs=1)
        os.kill(stopped.pid, signal.SIGINT)                   # Ctrl-C: KeyboardInterrupt inside the stage
        killed.wait(30)
        stopped.wait(60)
    finally:
        _stop(killed, signal.SIGKILL)
        _stop(stopped, signal.SIGKILL)
    assert stopped.returncode != 0
    client = tracking.MlflowClient(uri)
    run = client.get_run(stopped_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.ERROR_TAG] == "train: KeyboardInterrupt"
    deadline = time.monotonic() + 30                          # the watcher process marks the killed one
    while client.get_run(killed_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    run = client.get_run(killed_id)
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags[tracking.ERROR_TAG].startswith(f"train: the stage process (pid {killed.pid}) ended "
                                                        "without finishing (killed")
    assert len(_epochs(uri, killed_id)) >= 2
    assert _runs(uri, "RUNNING") == []

    # the re-run resumes the training after its last complete epoch, and the same run
    _inprocess(project, monkeypatch, ["train"], killed_params, killed_data)
    assert [r.info.run_id for r in _run_of(uri, killed_params)] == [killed_id]
    run = client.get_run(killed_id)
    assert run.info.status == "SCHEDULED" and tracking.ERROR_TAG not in run.data.tags
    assert [m.step for m in _epochs(uri, killed_id)] == list(range(1, 11))      # each epoch once


def test_bad_input_fails_the_run_with_the_line_the_stage_printed(project, monkeypatch, capsys):
    uri = project["uri"]
    params, data = _state(project, "damaged", epochs=3, lr=0.006)
    (data / EXP / "train").mkdir()
    (data / EXP / "train" / "model.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(SystemExit):
        _inprocess(project, monkeypatch, ["extract"], params, data)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    (run,) = _run_of(uri, params)
    assert run.info.status == "FAILED"
    stage, kind, message = run.data.tags[tracking.ERROR_TAG].split(": ", 2)
    assert (stage, message) == ("extract", line.removeprefix("error: ")) and kind.endswith("Error")
    assert _runs(uri, "RUNNING") == []


# --------------------------------------------------------------------------- through a real server
def _server(port: int, root: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            start_new_session=True)


def _up(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.3)


def test_through_a_server_that_goes_down_and_comes_back_during_training(project, booting_server):
    server = booting_server
    url = f"http://127.0.0.1:{server['port']}"
    _up(url, server["proc"])
    tracking.init_store(url)
    params, data = _state(project, "served", epochs=14, lr=0.007)
    proc = _train(project, params, data, slow=0.6, uri=url, extra={"ATTNLAB_LIVE_FLUSH": "90"})
    try:
        run_id, seen = _watch(proc, url, params, epochs=1)
        _stop(server["proc"], signal.SIGKILL, group=True)     # the server dies mid-training
        assert not _healthy(url)
        time.sleep(1.5)
        assert proc.poll() is None                           # training goes on
        server["proc"] = _server(server["port"], server["root"], server["root"] / "server.log")
        _up(url, server["proc"])
        err = _finish(proc)
    finally:
        _stop(proc, signal.SIGKILL)
    said = [line for line in _messages(err) if "MLflow" in line]
    assert len(said) == 1 and err.count("MLflow") == 1, err
    assert said[0].startswith(f"train: MLflow ({url}) is not answering (") and "kept and sent" in said[0]
    run = tracking.MlflowClient(url).get_run(run_id)
    assert run.info.status == "SCHEDULED"
    assert [m.step for m in _epochs(url, run_id)] == list(range(1, 15))   # every epoch arrived, once
    assert run.data.metrics["final.epochs"] == 14


# --------------------------------------------------------------------------- torchrun
def test_under_torchrun_only_process_zero_logs(project):
    """Two training processes (ATTNLAB_NPROC=2, as `NPROC=2 make run`): one run, each epoch
    logged once (a second process logging would double every step), one sampler."""
    uri = project["uri"]
    params, data = _state(project, "ddp", epochs=3, lr=0.008)
    proc = _train(project, params, data, slow=0, extra={"ATTNLAB_NPROC": "2"})
    err = _finish(proc, timeout=300)
    assert "train: 2 processes (torchrun, gloo)" in err
    (run,) = _run_of(uri, params)
    assert run.data.metrics["final.processes"] == 2
    for key in ("train_loss", "test_accuracy", "system/cpu_utilization_percentage"):
        steps = [m.step for m in _epochs(uri, run.info.run_id, key)]
        assert steps == sorted(set(steps)) and steps, (key, steps)
    assert [m.step for m in _epochs(uri, run.info.run_id)] == [1, 2, 3]
