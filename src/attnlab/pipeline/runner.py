"""The stage runner: what ``stages/<name>.py`` calls (``run("train")``).

``run("train")`` parses ``<experiment> [--params FILE] [--data DIR]``, validates the
whole params file, looks the experiment instance's kind up, sets torch's intra-op threads when
``ATTNLAB_NUM_THREADS`` is set (default: torch's, one per core; set it to 1 when
several stages run at once, e.g. ``dvc queue start -j 2``), and runs the stage's
function of :mod:`attnlab.pipeline.stages` with a :class:`~attnlab.layout.Layout` whose
stage directory is a temporary one, renamed to ``data/<experiment>/<stage>/`` only if
the stage succeeds. A bad params file or experiment name ends the process with one
line on stderr and exit status 2, before anything is written; so does a damaged input
file (:class:`~attnlab.io.DataError`: a truncated checkpoint or attention store) or a
full disk, and the stage's temporary directory is removed. When ``MLFLOW_TRACKING_URI``
names an http(s) tracking server, every stage first checks that it answers (within
seconds; :func:`attnlab.io.require_tracking_server`) and otherwise stops the same way,
before any work: a server that is down never costs a training run.

Train, extract and aggregate run as several processes under ``torchrun`` (started by
hand, or by the stage script itself when ``ATTNLAB_NPROC`` > 1): process 0 owns the
temporary directory and the others write into it only what process 0 merges
(:mod:`attnlab.distributed`).

A stage that succeeds records when it ran (:func:`~attnlab.pipeline.timing.record_timing`).

Live MLflow runs (docs/mlflow.md, "Live runs"): every stage after ``prepare`` opens (or
resumes) its pipeline state's run (:func:`attnlab.tracking.open_live_run`, found by the
state's live key: params, code, prepared data), on process 0 only under torchrun; train
streams its epochs and system metrics into it, each stage logs its outputs when it
succeeds (:data:`LIVE_ARTIFACTS`) and leaves the run SCHEDULED for the next one, a stage
that fails marks it FAILED with the error line (:func:`error_line`), and track finishes
it. The other stages open the run only after running ``ATTNLAB_LIVE_AFTER`` seconds
(:func:`live_after`; opening costs about 2 s of CPU): the outputs of a quicker one are
logged by track (a stage reads only what dvc.yaml declares it reads, so it does not log
an earlier stage's outputs). Live logging never fails a stage: a store that does not
answer is said in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from attnlab.config import ConfigError, load_params, stage_device
from attnlab.io import DataError, ServerUnreachable, atomic_dir, exit_now, require_tracking_server
from attnlab.layout import STAGES, Layout
from attnlab.pipeline.timing import now_ms, record_timing


@dataclass
class StageContext:
    name: str
    experiment: Any        # the experiment kind (attnlab.experiments.Experiment)
    cfg: Any               # its validated params section
    layout: Layout         # its files; the running stage's resolve into its temporary directory


@contextlib.contextmanager
def stage(name: str, argv: list[str] | None = None) -> Iterator[StageContext]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    start_ms = now_ms()
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"attnlab '{name}' stage")
    parser.add_argument("experiment")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    args = parser.parse_args(argv)
    try:            # a tracking server that is down fails every stage at once, not track after training
        require_tracking_server()
    except ServerUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import attnlab.distributed as distributed
    from attnlab.experiments import get_experiment

    if os.environ.get("ATTNLAB_NUM_THREADS"):
        threads = int(os.environ["ATTNLAB_NUM_THREADS"])
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:                                  # what torch reads when the stage imports it (if it does)
            os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        after = live_after()
        params = load_params(args.params)
        cfg = params.experiment(args.experiment)
        experiment = get_experiment(params.kind(args.experiment))
        parallel = name in distributed.STAGES
        if not parallel and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"the {name!r} stage runs in one process; torchrun runs "
                              f"{', '.join(distributed.STAGES)}")
        if parallel and argv is None:          # NPROC=N make run: this stage again, under torchrun
            distributed.relaunch(name, sys.argv)
    except (ConfigError, KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    if parallel and distributed.launched():
        distributed.init(stage_device(cfg))
        if distributed.active() and distributed.is_main():
            print(f"{name}: {distributed.world_size()} processes (torchrun, {distributed.backend()})",
                  file=sys.stderr)
    root = Path(args.data) / args.experiment
    if not parallel or distributed.is_main():  # under torchrun only process 0 writes the outputs
        opening = (lambda: _open_live(name, args.experiment, experiment, cfg, Layout(root), start_ms, args.params))
        # train logs into the run while it runs, track finishes it: they open it first; the
        # other stages only log their outputs at the end, so their run opens in a thread
        # while they work (importing MLflow and a few store queries: about 2 s of CPU), and
        # only once they have run for ATTNLAB_LIVE_AFTER seconds (a quicker stage's outputs
        # are logged by track)
        live = opening() if name in ("train", "track") else _Opening(opening, after)
        with contextlib.ExitStack() as watching:
            if isinstance(live, _Opening):
                watching.enter_context(_failing(live))
            elif live is not None:
                watching.enter_context(live.active())
                watching.enter_context(_failing(live))
                if name == "train":            # per-epoch and system metrics while it trains
                    from attnlab.training import on_epoch

                    watching.enter_context(on_epoch(live.log_epoch))
                    watching.enter_context(live.streaming())
            with atomic_dir(root / name) as out:
                if parallel:
                    distributed.broadcast(str(out))
                yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))
                if parallel:
                    distributed.barrier()      # every process done before the directory is renamed
            record_timing(Layout(root), name, start_ms, now_ms(),     # only a stage that succeeded
                          processes=distributed.world_size() if parallel else 1)
        if isinstance(live, _Opening):
            live = live.result()
        if live is not None:
            _log_stage_outputs(live, name, Layout(root))
    else:
        out = Path(distributed.broadcast(None))
        yield StageContext(name, experiment, cfg, Layout(root, writing=(name, out)))
        distributed.barrier()


#: What each stage logs into the live run when it succeeds: artifact directory -> stage
#: directory (track logs the model, the checkpoint and the dataset, and finishes the run).
LIVE_ARTIFACTS = {"extract": {"attention": "extract"}, "aggregate": {"aggregate": "aggregate"},
                  "explain": {"explain": "explain"}, "evaluate": {"evaluate": "evaluate"},
                  "report": {"report": "report"}}


def live_enabled(data_root: Path) -> bool:
    """Whether stages log into a live MLflow run: not when ``ATTNLAB_LIVE=0``, nor into a
    SQLite store that does not exist yet (``make store`` creates it once, before stages
    may run in parallel; until then ``track`` logs each state whole, as it creates the
    store); with ``MLFLOW_TRACKING_URI`` set, always; with the project's own store, when
    the data directory is inside the project (a test's data elsewhere never logs into
    the project's store)."""
    from attnlab.io import missing_sqlite, project_root, tracking_uri     # not mlflow: decided before importing it

    if os.environ.get("ATTNLAB_LIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if missing_sqlite(tracking_uri()):
        return False
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return True
    return project_root() in [data_root.resolve(), *data_root.resolve().parents]


def _open_live(name: str, instance: str, experiment: Any, cfg: Any, lay: Layout, start_ms: int,
               params_file: str) -> Any:
    """The state's live run (:func:`attnlab.tracking.open_live_run`) for every stage after
    ``prepare`` (whose outputs are part of the state's key), or None: not enabled, no
    prepared data yet (the stage will say so), the state already logged, or a store that
    fails (one line on stderr; the track stage logs everything at the end as before)."""
    if name == "prepare" or not live_enabled(lay.root) or not (lay.dataset.is_file() and lay.meta.is_file()):
        return None
    from attnlab.config import flatten
    from attnlab.pipeline.timing import stage_records, stage_times

    try:
        import attnlab.tracking as tracking

        params = flatten(cfg) | ({"kind": experiment.name} if experiment.name != instance else {})
        key = tracking.live_key({**params, "device": str(getattr(cfg, "_device", ""))},
                                tracking.code_digest(Path("stages")), [lay.dataset, lay.meta])

        def start_time() -> int:
            # the state's start: when prepare ran, if its outputs are still the ones in place.
            # Only prepare's: checking a record hashes the outputs it belongs to, and prepare's
            # are the one upstream output every later stage declares (external-explain, run
            # late under load, once hashed extract's, which it does not read otherwise: the
            # stage tracer caught it). track sets the state's real start and end at the end.
            first, _, _ = stage_times(stage_records(lay, ["prepare"]))
            return min(start_ms, first or start_ms)

        return tracking.open_live_run(instance, key=key, params=params, stage=name, start_time=start_time,
                                      params_file=params_file)
    except Exception as err:                   # noqa: BLE001 - live logging never stops a stage
        line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{name}: no live MLflow run ({type(err).__name__}: {line[:200]}); the track stage logs the state",
              file=sys.stderr)
        return None


def error_line(err: BaseException) -> str:
    """The first line of what ended a stage: ``DataError: ...`` (also behind the
    ``SystemExit(2)`` that reports it), ``KeyboardInterrupt``, ``exit status 2``."""
    if isinstance(err, SystemExit) and err.__context__ is not None:
        err = err.__context__
    if isinstance(err, SystemExit):
        return f"exit status {err.code}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def live_after() -> float:
    """``ATTNLAB_LIVE_AFTER``: seconds a stage other than train and track runs before it
    opens its live run (default 15; 0: at once). Opening imports MLflow and queries the
    store, about 2 s of CPU in a thread beside the stage's work, which costs the stage
    1-2 s (measured: report of frames 9.0 -> 11.0 s, evaluate of motion 10.0 -> 11.8 s,
    explain of video 21.1 -> 22.0 s): a stage that ends sooner leaves its outputs to track,
    which logs them seconds to a minute later; a longer one pays at most about a tenth."""
    value = os.environ.get("ATTNLAB_LIVE_AFTER", "").strip() or "15"
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"ATTNLAB_LIVE_AFTER={value!r}: expected a number of seconds >= 0")
    return seconds


class _Opening:
    """A live run opened in a background thread (:func:`_open_live`) once the stage has run
    ``after`` seconds: a stage that succeeds sooner never opens it (:meth:`result` is None);
    one that fails opens it at once, to mark it FAILED (:meth:`fail`)."""

    def __init__(self, open_run: Callable[[], Any], after: float = 0.0):
        self._live: Any = None
        self._now = threading.Event()          # open now (a failure), or never (a success)
        self._lock = threading.Lock()
        self._cancelled = self._started = False
        self._thread = threading.Thread(target=self._open, args=(open_run, after), name="attnlab-live-open",
                                        daemon=True)
        self._thread.start()

    def _open(self, open_run: Callable[[], Any], after: float) -> None:
        self._now.wait(after)
        with self._lock:
            if self._cancelled:
                return
            self._started = True
        self._live = open_run()                # never raises: a failing store is one line on stderr

    def result(self) -> Any:
        """The live run once it is open, or None: not opened yet (the stage was quick), or
        it could not be."""
        with self._lock:
            self._cancelled = not self._started
        self._now.set()
        self._thread.join()
        return self._live

    def fail(self, message: str) -> None:
        self._now.set()                        # open it now, if it is not open yet
        self._thread.join()
        if self._live is not None:
            self._live.fail(message)


@contextlib.contextmanager
def _failing(live: Any) -> Iterator[None]:
    """Mark the live run FAILED, with the error line, when the block raises (or exits)."""
    try:
        yield
    except BaseException as err:
        live.fail(error_line(err))
        raise


def _log_stage_outputs(live: Any, name: str, lay: Layout) -> None:
    """A succeeded stage's outputs into the live run: train's final metrics
    (``final.*``), evaluate's (``evaluate.*``) and the stage directories of
    :data:`LIVE_ARTIFACTS`; then the run waits for the next stage."""
    import attnlab.tracking as tracking
    import attnlab.io as io

    if live.closed:
        return
    if name == "track":                        # its body finished the run (or found it logged before)
        live.fail("the track stage ended without finishing the run")
        return
    metrics: dict[str, float] = {}
    try:
        if name == "train" and lay.train_metrics.is_file():
            metrics = tracking.flat_metrics(io.read_json(lay.train_metrics), "final")
        elif name == "evaluate" and lay.metrics.is_file():
            metrics = tracking.flat_metrics(io.read_json(lay.metrics), "evaluate")
        live.log_outputs(metrics=metrics, artifacts={a: lay.dir(s) for a, s in LIVE_ARTIFACTS.get(name, {}).items()})
    finally:
        live.end_stage()


def run(name: str, argv: list[str] | None = None, *, progress: bool = True) -> None:
    """Run stage ``name`` for the experiment named on the command line (``argv``).

    Run as a script (``argv`` None: the arguments are ``sys.argv``), a stage that succeeded
    ends its process as soon as its outputs are in place (:func:`exit_now`); a stage that
    fails, and a call with ``argv`` (e.g. from a test), return or raise as usual."""
    _run(name, argv, progress=progress)
    if argv is None:
        exit_now()


def _run(name: str, argv: list[str] | None, *, progress: bool) -> None:
    import attnlab.distributed as distributed
    from attnlab.pipeline.stages import STAGE_FUNCTIONS

    with contextlib.ExitStack() as cleanup:
        if name in distributed.STAGES:
            cleanup.callback(distributed.shutdown)
        s = cleanup.enter_context(stage(name, argv))
        try:
            STAGE_FUNCTIONS[name](s.experiment, s.cfg, s.layout, progress=progress)
        except DataError as err:               # a damaged input file: one line, nothing written
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            what = Path(err.filename).name if err.filename else "its outputs"
            print(f"error: no space left on device: the {name!r} stage of {s.layout.root} stopped while writing "
                  f"{what} and wrote nothing (its temporary directory was removed); free some space and re-run",
                  file=sys.stderr)
            raise SystemExit(2) from None
