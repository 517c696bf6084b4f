"""MLflow run handling: the only module of attnlab that imports mlflow.

* The store defaults to an embedded SQLite file at an **absolute** path in the
  project (``sqlite:///<root>/mlflow.db``, artifacts in ``<root>/mlartifacts``);
  ``MLFLOW_TRACKING_URI`` overrides it (e.g. an ``mlflow server`` for teams).
* Queued DVC experiments run in a temporary copy under ``<root>/.dvc/tmp/exps/``;
  :func:`project_root` sees through that copy so their runs land in the project's
  store, not in a directory that is deleted afterwards. ``ATTNLAB_ROOT`` overrides.
* One MLflow experiment per attnlab experiment. One run per pipeline state: the
  state key hashes the experiment's params and the content of every output the
  run records, so a changed param yields a new run (MLflow params are immutable)
  and an unchanged state is never logged twice.
* The run is live (:class:`LiveRun`): the stage runner opens it when the first stage
  of a state starts (found again by the *live key*: the params, the code and the
  prepared data, :func:`live_key`), training streams per-epoch and system metrics
  into it, each later stage logs its outputs when it finishes, and ``track`` finishes
  it (FINISHED) under the state key above. A stage that fails marks it FAILED with the
  error as the tag ``attnlab.error``, a killed one too (:func:`_stage_died`, from a
  watcher process); re-running the state resumes it. Metrics that a tracking server
  does not take (it went down) are kept and sent when it answers again; ``track``
  logs whatever is still missing from the files.
* :func:`log_pipeline_run` without a live run logs a state completely or not at all:
  on any error its run is marked FAILED and deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import contextlib
import contextvars
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Metric, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from attnlab.io import (ServerUnreachable, hash_file, missing_sqlite, project_root,  # noqa: E402,F401
                        require_tracking_server, tracking_uri)

STATE_TAG = "attnlab.state_key"
#: The live run's key (params, code, prepared data: :func:`live_key`), set when it opens.
LIVE_TAG = "attnlab.live_key"
#: A failed run's error: ``<stage>: <first line of the error>``.
ERROR_TAG = "attnlab.error"
#: While a stage logs into the run: ``<stage> (pid <pid>)``.
RUNNING_TAG = "attnlab.running"
#: ``attnlab.logged.<artifact dir>``: digest of the directory logged there (:func:`dir_digest`).
LOGGED_TAG = "attnlab.logged."
#: dvc.lock is read with libyaml's parser where PyYAML was built with it (the same objects
#: as ``yaml.safe_load``): this project's 4,600-line lock takes 0.05 s instead of 0.41 s,
#: paid by every stage that opens a live run, every ``track`` and the index page.
_LOCK_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: MLflow 3's experiment kind (the UI's "Machine learning" vs "GenAI apps & agents").
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
#: The UI's own guesses, which an explicit kind replaces (a user's explicit choice stays).
_INFERRED_KINDS = ("", "no_inferred_type", "custom_model_development_inferred", "genai_development_inferred")


def init_store(uri: str | None = None) -> str:
    """Create (or upgrade) the store once, before any parallel use. A tracking server
    that does not answer raises :class:`~attnlab.io.ServerUnreachable` within seconds."""
    uri = uri or tracking_uri()
    require_tracking_server(uri)
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


def experiment_id(client: MlflowClient, name: str, root: Path) -> str:
    """The experiment ``name``, created if missing, of the training kind
    (:data:`KIND_TAG`), which is also set on an existing experiment that has no
    explicit kind yet."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(KIND_TAG, "") in _INFERRED_KINDS:
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (root / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})


def state_key(params: Mapping[str, Any], files: Iterable[str | Path]) -> str:
    """sha256 of the params and of the content of ``files`` (the recorded outputs)."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in files):
        h.update(str(path).encode())
        hash_file(h, path)
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    """``git <args>`` in ``root``: its output, or None (no git, not a repository...)."""
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance_tags(root: Path, experiment: str) -> dict[str, str]:
    """The source (MLflow's ``mlflow.source.*`` tags: the repository, its commit and
    branch; ``git.dirty``: tracked files changed since the commit, other than what DVC
    writes while it runs), the DVC experiment name and the dvc.lock hashes of this
    experiment's stages."""
    tags = {"attnlab.experiment": experiment,
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
            "mlflow.source.type": "LOCAL", "mlflow.source.name": str(root)}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    head = _git(root, "rev-parse", "HEAD")
    if head:
        tags["mlflow.source.git.commit"] = tags["git.commit"] = head
        # changes to tracked files, but not the ones DVC itself writes while it runs the
        # pipeline being logged (dvc.lock, the .gitignore files beside its outputs)
        tags["git.dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                          ":(exclude)dvc.lock", ":(exclude,glob)data/**/.gitignore",
                                          ":(exclude)data/.gitignore")))
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git(root, "remote", "get-url", "origin")
        if remote:
            tags["mlflow.source.name"] = tags["mlflow.source.git.repoURL"] = remote
    lock = Path.cwd() / "dvc.lock"
    if lock.exists():
        stages = (yaml.load(lock.read_text(), Loader=_LOCK_LOADER) or {}).get("stages", {})
        for name, entry in stages.items():
            if name.endswith(f"@{experiment}"):
                outs = json.dumps(entry.get("outs", []), sort_keys=True)
                tags[f"dvc.lock.{name.split('@')[0]}"] = hashlib.md5(outs.encode()).hexdigest()[:12]
    return tags


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_params(root: Path, section: str, params_file: str | Path = "params.yaml") -> dict[str, Any]:
    """The params of ``section`` in ``params_file`` that differ from the committed file
    (``git show HEAD:<file>`` in ``root``), as flat keys (``train.lr``); a key removed
    since is None. Empty without git or when HEAD has no such section (a new one)."""
    params_file = Path(params_file).resolve()
    try:
        rel = params_file.relative_to(Path(root).resolve()).as_posix()
        now = (yaml.safe_load(params_file.read_text()) or {}).get(section)
    except (ValueError, OSError):
        return {}
    committed = _git(root, "show", f"HEAD:{rel}")
    before = (yaml.safe_load(committed) or {}).get(section) if committed is not None else None
    if not isinstance(before, Mapping) or not isinstance(now, Mapping):
        return {}
    before, now = _flat(before), _flat(now)
    return {k: now.get(k) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}


def run_name(experiment: str, tags: Mapping[str, str], changed: Mapping[str, Any], *, limit: int = 80) -> str:
    """What a run is, for the runs table: the DVC experiment's name (``dvc exp run``),
    else the params changed from the committed ``params.yaml`` (``motion lr=0.001``:
    the last part of each key unless two share it), else ``<experiment> @ <commit>``."""
    if tags.get("dvc.exp_name", "workspace") != "workspace":
        return tags["dvc.exp_name"]
    if changed:
        leaves = [k.rsplit(".", 1)[-1] for k in changed]
        parts = [f"{leaf if leaves.count(leaf) == 1 else key}="
                 f"{'(default)' if value is None else json.dumps(value) if isinstance(value, (list, dict)) else value}"
                 for key, leaf, value in zip(changed, leaves, changed.values())]
        name, shown = experiment, 0
        for part in parts:
            if len(name) + len(part) + 1 > limit and shown:
                break
            name, shown = f"{name} {part}", shown + 1
        return name + (f" +{len(parts) - shown} more" if shown < len(parts) else "")
    commit = tags.get("git.commit")
    return f"{experiment} @ {commit[:7]}" if commit else experiment


def flat_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``prefix.a.b`` keys, booleans as 1/0
    (e.g. ``sanity.passed.rollout``, so runs can be compared on them); others skipped.
    A character MLflow refuses in a key (it takes letters, digits, ``_-. /``), e.g. from
    a user's module name, becomes ``_``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and value == value:
            out[name] = float(value)
    return out


def _history_metrics(history: pd.DataFrame, step_col: str) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(str(col), float(v), now, int(step))
            for col in history.columns if col != step_col
            for step, v in zip(history[step_col], history[col])]


def log_pipeline_run(experiment: str, *, params: Mapping[str, Any], metrics: Mapping[str, float],
                     files: Iterable[str | Path], history: pd.DataFrame | None = None,
                     history_step: str = "epoch", model: Any = None,
                     model_example: tuple[Any, Any] | None = None,
                     artifacts: Mapping[str, str | Path] | None = None,
                     dataset: str | Path | None = None, dataset_name: str | None = None,
                     start_time: int | None = None, end_time: int | None = None,
                     untimed: Iterable[str] = (), stages: Mapping[str, Mapping[str, Any]] | None = None,
                     root: Path | None = None) -> tuple[str, bool]:
    """Log one pipeline state of ``experiment`` as one MLflow run.

    ``params`` are logged once; ``history`` (one row per step) as metric histories;
    ``metrics`` as final values; ``model`` as a pickled torch module (loadable as its
    original class) with the signature and input example of ``model_example``
    (``(inputs, output)``, from :func:`model_example`); ``artifacts`` maps an artifact
    directory to a local file or directory; ``dataset`` (the prepared ``.npz``, named
    ``dataset_name``) is the run's training dataset input (:func:`dataset_entity`).
    ``start_time``/``end_time`` (ms since the epoch; default now) are the state's
    real start and end (the stages' own timings), ``untimed`` the stages whose times
    were unknown (tag ``attnlab.timing``); ``stages`` maps a stage to its record
    (``start_ms``, ``end_ms``, ``processes``, ``threads``), each a tag
    ``attnlab.stage.<stage>`` such as ``6.8 s, 2 processes x 1 thread``. The run is
    named by :func:`run_name`.
    ``files`` are the outputs whose content (with ``params``) identifies the state;
    the times and the dataset do not enter it. Returns ``(run_id, created)``: an
    identical state returns the existing run and logs nothing.

    Inside a stage that has a live run (:func:`current_run`, opened by the stage runner),
    that run is completed instead of a new one created: it gets the state key and the
    tags, and only what it does not hold yet (params not logged, history steps missing,
    metrics whose value differs, artifact directories whose ``attnlab.logged.<dir>``
    digest differs), then FINISHED; when another run already holds this state, the live
    run is deleted and that one returned. An error leaves the live run to the runner (FAILED).
    """
    root = project_root(root)
    live = current_run()
    if live is not None and live.experiment != experiment:
        live = None
    client = live.client if live is not None else MlflowClient(tracking_uri(root))
    files = list(files)
    key = state_key(params, files)
    exp_id = experiment_id(client, experiment, root)
    found = client.search_runs([exp_id], filter_string=f"tags.`{STATE_TAG}` = '{key}'", max_results=10)
    for run in found:
        if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            if live is not None and live.run_id != run.info.run_id:
                live.discard()                 # this state was logged before: its live run is a duplicate
            return run.info.run_id, False
    for run in found:
        if live is None or run.info.run_id != live.run_id:
            client.delete_run(run.info.run_id)   # a crashed earlier attempt

    tags = {STATE_TAG: key, **provenance_tags(root, experiment), **_timing_tags(start_time, untimed),
            **{f"attnlab.stage.{stage}": _stage_tag(record) for stage, record in (stages or {}).items()}}
    name = run_name(experiment, tags, changed_params(root, experiment, Path.cwd() / "params.yaml"))
    if live is not None:
        run_id = live.run_id
        run = client.get_run(run_id)
        client.update_run(run_id, name=name)
    else:
        run = client.create_run(exp_id, start_time=start_time, run_name=name, tags=tags)
        run_id = run.info.run_id
    try:
        if dataset is not None:
            client.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(
                dataset_entity(dataset, dataset_name or Path(dataset).stem),
                tags=[mlflow.entities.InputTag("mlflow.data.context", "training")])])
        have = _HaveSteps(client, run_id) if live is not None else None
        metric_rows = _history_metrics(history, history_step) if history is not None else []
        if have is not None:                   # the epochs that training streamed are not logged twice
            metric_rows = [m for m in metric_rows if not have.holds(m.key, m.step)]
        now = int(time.time() * 1000)
        metric_rows += [Metric(k, float(v), now, 0) for k, v in metrics.items()
                        if run.data.metrics.get(k) != float(v)]
        param_rows = [mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in run.data.params]
        tag_rows = [mlflow.entities.RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(tag_rows), 100):
            client.log_batch(run_id, tags=tag_rows[i:i + 100])
        for i in range(0, len(param_rows), 100):      # log_batch takes <= 100 params, 1000 metrics
            client.log_batch(run_id, params=param_rows[i:i + 100])
        for i in range(0, len(metric_rows), 1000):
            client.log_batch(run_id, metrics=metric_rows[i:i + 1000])
        for art_dir, path in (artifacts or {}).items():
            if live is None or run.data.tags.get(LOGGED_TAG + art_dir) != dir_digest(path):
                _log_artifacts(client, run_id, path, art_dir)
        if model is not None:
            _log_model(client, run_id, model, model_example)
        if live is not None:
            live.finish(end_time)
        else:
            client.set_terminated(run_id, "FINISHED", end_time=end_time)
    except BaseException:
        if live is None:
            client.set_terminated(run_id, "FAILED")
            client.delete_run(run_id)
        raise                                  # a live run: the stage runner marks it FAILED, with the error
    return run_id, True


def _log_artifacts(client: MlflowClient, run_id: str, path: str | Path, art_dir: str) -> None:
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), art_dir)
    else:
        client.log_artifact(run_id, str(path), art_dir)


class _HaveSteps:
    """The steps a run holds of each metric (read once per metric, when first asked)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id, self.steps = client, run_id, {}

    def holds(self, key: str, step: int) -> bool:
        if key not in self.steps:
            self.steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return step in self.steps[key]


def _timing_tags(start_time: int | None, untimed: Iterable[str]) -> dict[str, str]:
    """``attnlab.timing``: ``stages`` (the run's start and end are the stages' own),
    ``partial`` (of the stages with known times; those in ``attnlab.timing.unknown``
    had none, e.g. outputs restored from DVC's cache) or ``now`` (none known: the times
    are the track stage's own)."""
    untimed = sorted(untimed)
    tags = {"attnlab.timing": "now" if start_time is None else "partial" if untimed else "stages"}
    if untimed:
        tags["attnlab.timing.unknown"] = ", ".join(untimed)
    return tags


def _stage_tag(record: Mapping[str, Any]) -> str:
    """``"6.8 s, 2 processes x 1 thread"``: a stage's wall time and resources."""
    text = f"{(record['end_ms'] - record['start_ms']) / 1000:.1f} s"
    if "processes" in record and "threads" in record:
        p, t = int(record["processes"]), int(record["threads"])
        text += f", {p} process{'es' if p > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
    return text


def _npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (shape, dtype)}`` of the arrays of an ``.npz``, read from their headers
    (nothing is decompressed)."""
    import zipfile

    import numpy as np

    out = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[member.removesuffix(".npy")] = (tuple(shape), dtype)
    return out


def dataset_entity(path: str | Path, name: str) -> mlflow.entities.Dataset:
    """The prepared data file ``path`` (``.npz``) as an MLflow dataset: its name, its
    digest (the MD5 of the file, which is also its name in DVC's cache), the file as
    source, and each array's shape and dtype as schema and profile (``y_*`` arrays as
    targets), without the data themselves."""
    import math

    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    path = Path(path).resolve()
    specs: dict[str, list] = {"features": [], "targets": []}
    profile: dict[str, dict[str, Any]] = {}
    for key, (shape, dtype) in _npz_arrays(path).items():
        part = "targets" if key.startswith("y_") else "features"
        specs[part].append(TensorSpec(dtype, shape, key))
        size = math.prod(shape)
        for what, value in (("shape", list(shape)), ("size", size), ("nbytes", size * dtype.itemsize)):
            profile.setdefault(f"{part}_{what}", {})[key] = value
    schema = TensorDatasetSchema(features=Schema(specs["features"]),
                                 targets=Schema(specs["targets"]) if specs["targets"] else None)
    source = LocalArtifactDatasetSource(str(path))
    return mlflow.entities.Dataset(
        name=name[:500], digest=hash_file(hashlib.md5(), path).hexdigest(),
        source_type=source._get_source_type(), source=source.to_json(),
        schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))


def model_example(model: Any, call: Any) -> tuple[Any, Any]:
    """``(inputs, output)`` of ``model``'s first call while ``call()`` runs it (e.g.
    ``lambda: exp.forward(model, batch)``), as arrays: one positional tensor as an
    array, several as ``{forward's parameter name: array}``; the output an array
    (several: ``{"output_<i>": array}``). What the logged model receives, whatever
    packing the experiment does around it; no gradients."""
    import inspect

    import torch

    calls: list[tuple] = []

    def first_call(module, args, kwargs, output):
        if not calls:
            calls.append((args, kwargs, output))

    handle = model.register_forward_hook(first_call, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    if not calls:
        raise ValueError("model_example: call() did not run the model")
    args, kwargs, output = calls[0]
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names += [f"input_{i}" for i in range(len(names), len(args))]
    array = lambda t: t.detach().cpu().numpy()  # noqa: E731
    inputs = {n: array(v) for n, v in [*zip(names, args), *kwargs.items()] if isinstance(v, torch.Tensor)}
    if len(inputs) == 1 and len(args) >= 1 and isinstance(args[0], torch.Tensor):
        inputs = inputs[names[0]]
    if isinstance(output, torch.Tensor):
        output = array(output)
    elif isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        output = {f"output_{i}": array(o) for i, o in enumerate(output)}
    else:
        output = None
    return inputs, output


def _log_model(client: MlflowClient, run_id: str, model: Any, example: tuple[Any, Any] | None = None) -> None:
    import torch
    import mlflow.pytorch
    from mlflow.models import infer_signature

    package = Path(__file__).resolve().parent
    mlflow.set_tracking_uri(client.tracking_uri)
    # pickle is chosen knowingly (pt2 reloads a GraphModule, on which hooks never fire)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    signature = infer_signature(*example) if example is not None else None
    # MLflow checks an input example by calling the model as its pyfunc, which takes one
    # array: a model of several inputs (e.g. tokens and mask) fails that check with a
    # warning, although mlflow.pytorch.load_model gives it back whole, callable by name
    several = example is not None and isinstance(example[0], Mapping)
    check_log = logging.getLogger("mlflow.models.model")
    level = check_log.level
    if several:
        check_log.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",   # pt2 reloads a GraphModule
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                code_paths=[str(package)], signature=signature,
                input_example=example[0] if example is not None else None)
    finally:
        check_log.setLevel(level)
    # start_run(run_id=...) ends the run FINISHED on exit; the caller decides the final status
    client.update_run(run_id, status="RUNNING")


def find_runs(experiment: str, root: Path | None = None) -> pd.DataFrame:
    """The experiment's runs as a DataFrame (params, metrics, tags), newest first."""
    root = project_root(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])


#: The error codes of a run id that the store does not hold (or that cannot be one).
_NO_SUCH_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _run_record(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "start_time": run.info.start_time,
            "end_time": run.info.end_time, "commit": run.data.tags.get("git.commit"),
            "metrics": dict(run.data.metrics)}


def recent_runs(experiment: str, n: int = 5, root: Path | None = None, *,
                current: str | None = None) -> list[dict[str, Any]]:
    """The last ``n`` finished runs of the MLflow experiment ``experiment``, newest first
    (by start time), as plain dicts: ``run_id``, ``name``, ``start_time`` and ``end_time``
    (ms since the epoch), ``commit`` (tag ``git.commit``) and ``metrics`` (``{key: value}``).
    When ``current`` (a run id of that experiment) is not among them, they are followed by
    that run and the finished run that started just before it, so a state can always be
    compared with its predecessor. Empty when the store (a SQLite file is never created
    here) or the experiment does not exist."""
    uri = tracking_uri(root)
    if missing_sqlite(uri):
        return []
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    finished, order = "attributes.status = 'FINISHED'", ["attributes.start_time DESC"]
    runs = list(client.search_runs([exp.experiment_id], finished, order_by=order, max_results=n))
    if current and current not in {r.info.run_id for r in runs}:
        try:
            run = client.get_run(current)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code not in _NO_SUCH_RUN:
                raise
            run = None
        if run is not None and run.info.experiment_id == exp.experiment_id and run.info.lifecycle_stage == "active":
            runs += [run, *client.search_runs([exp.experiment_id],
                                              f"{finished} and attributes.start_time < {run.info.start_time}",
                                              order_by=order, max_results=1)]
    return [_run_record(r) for r in runs]


class NoSuchRun(LookupError):
    """Runs that the MLflow store does not hold (``run_ids``), or no store at all."""

    def __init__(self, message: str, run_ids: Iterable[str]):
        super().__init__(message)
        self.run_ids = list(run_ids)


def log_artifact_to_runs(run_ids: Iterable[str], path: str | Path, artifact_path: str,
                         root: Path | None = None) -> None:
    """Log the file ``path`` into ``artifact_path`` of every run of ``run_ids`` (finished runs
    take artifacts too). Every run is looked up first: when the store or one of the runs
    does not exist (or was deleted), :class:`NoSuchRun` names them and nothing is logged."""
    uri = tracking_uri(root)
    run_ids = list(run_ids)
    if missing_sqlite(uri):
        raise NoSuchRun(f"the MLflow store {uri} does not exist", run_ids)
    client = MlflowClient(uri)
    missing = []
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.lifecycle_stage != "active":
                missing.append(run_id)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code not in _NO_SUCH_RUN:
                raise
            missing.append(run_id)
    if missing:
        raise NoSuchRun(f"the MLflow store {uri} has no (active) run {', '.join(missing)}", missing)
    for run_id in run_ids:
        client.log_artifact(run_id, str(path), artifact_path)


# --------------------------------------------------------------------------- the live run
def dir_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of every file under a directory (relative path and content)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" if path.is_dir() else b"")
        hash_file(h, f)
    return h.hexdigest()


def code_digest(*dirs: str | Path, package: str | Path | None = None) -> str:
    """SHA-256 of the Python code that runs the stages: every ``*.py`` under attnlab's
    package directory (``package``: this one) and under ``dirs`` (e.g. ``stages/``) that
    exist, by relative path and content."""
    h = hashlib.sha256()
    for base in [Path(package or Path(__file__).resolve().parent), *(Path(d) for d in dirs)]:
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*.py")):
            if "__pycache__" not in f.parts:
                h.update(f"{base.name}/{f.relative_to(base).as_posix()}".encode() + b"\0")
                hash_file(h, f)
    return h.hexdigest()


def live_key(params: Mapping[str, Any], code: str, files: Iterable[str | Path]) -> str:
    """The key that finds a pipeline state's live run from its first stage on, before any
    output exists: sha256 of ``params``, the ``code`` digest (:func:`code_digest`) and
    the content of ``files`` (the prepared data), each file by its name, so the same
    state in another directory (a DVC queue's copy) has the same key."""
    h = hashlib.sha256(json.dumps([dict(params), code], sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in files):
        h.update(path.name.encode() + b"\0")
        hash_file(h, path)
    return h.hexdigest()


_CURRENT: contextvars.ContextVar["LiveRun | None"] = contextvars.ContextVar("attnlab_live_run", default=None)


def current_run() -> "LiveRun | None":
    """The live run the running stage logs into (set by the stage runner), or None."""
    return _CURRENT.get()


def _short(err: BaseException) -> str:
    """One short line saying why a call to the store failed."""
    text = str(err)
    found = re.search(r"is not reachable \((.*?)\)", text)
    if found:
        return found.group(1)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"[:200]


class _Sender:
    """Sends metrics to a run from a thread of its own, so training never waits for the
    store; what the store does not take (a server that went down) is kept and sent again
    every ``retry`` seconds, and the first failure is said in one line on stderr."""

    def __init__(self, live: "LiveRun", retry: float = 5.0):
        self.live, self.retry = live, retry
        self.pending: list[tuple[Metric, bool]] = []     # (metric, skip if the run holds its step)
        self.lock = threading.Lock()
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.failed_at: float | None = None
        self.deadline = 0.0
        self.have: _HaveSteps | None = None
        self.thread = threading.Thread(target=self._loop, name="attnlab-mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, metrics: Iterable[Metric], *, once_per_step: bool = False) -> None:
        with self.lock:
            self.pending.extend((m, once_per_step) for m in metrics)
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.retry if self.failed_at is not None else None)
            self.wake.clear()
            self.send()
        while not self.send(force=True) and time.monotonic() + 1.0 < self.deadline:
            time.sleep(min(self.retry, 1.0))   # closing: keep trying until the deadline

    def send(self, force: bool = False) -> bool:
        """Send what is pending; False when something is still pending."""
        with self.lock:
            batch = list(self.pending)
        if not batch:
            return True
        if not force and self.failed_at is not None and time.monotonic() - self.failed_at < self.retry:
            return False
        live = self.live
        try:
            require_tracking_server(live.uri, timeout=2.0)     # a dead server: seconds, not MLflow's retries
            if self.have is None:
                self.have = _HaveSteps(live.client, live.run_id)
            rows = [m for m, once in batch if not (once and self.have.holds(m.key, m.step))]
            for i in range(0, len(rows), 1000):
                live.client.log_batch(live.run_id, metrics=rows[i:i + 1000])
                for m in rows[i:i + 1000]:
                    self.have.steps.setdefault(m.key, set()).add(m.step)
        except Exception as err:               # noqa: BLE001 - the store's trouble never stops training
            self.failed_at = time.monotonic()
            live.trouble(err)
            return False
        with self.lock:
            del self.pending[:len(batch)]
            left = bool(self.pending)
        self.failed_at = None
        return not left

    def close(self, timeout: float) -> bool:
        """Stop after one last attempt (within ``timeout`` s); True when everything was sent."""
        self.deadline = time.monotonic() + timeout
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout + 3.0)
        with self.lock:
            return not self.thread.is_alive() and not self.pending


class _SystemMetrics:
    """MLflow's own system-metrics monitors (CPU, memory, disk, network; GPU when
    ``pynvml`` finds one) sampled every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    seconds (MLflow's variable; default 10), once more when stopped, and sent as
    ``system/*`` metrics through the run's sender (steps continue the run's)."""

    def __init__(self, live: "LiveRun", interval: float = 10.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        self.live = live
        try:
            self.monitor = SystemMetricsMonitor(live.run_id, sampling_interval=interval, resume_logging=True,
                                                tracking_uri=live.uri)
        except Exception as err:               # noqa: BLE001 - no step to continue from: the store is down
            live.trouble(err)
            self.monitor = SystemMetricsMonitor(live.run_id, sampling_interval=interval, tracking_uri=live.uri)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="attnlab-system-metrics", daemon=True)
        self.thread.start()

    def _clear(self) -> None:
        for m in self.monitor.monitors:
            m.clear_metrics()

    def _sample(self) -> None:
        self.monitor.collect_metrics()
        values = self.monitor.aggregate_metrics()
        self._clear()
        now, step = int(time.time() * 1000), self.monitor._logging_step
        self.monitor._logging_step += 1
        self.live.sender.put([Metric(f"system/{k}", float(v), now, step) for k, v in values.items()])

    def _loop(self) -> None:
        self.monitor.collect_metrics()         # primes psutil's CPU reading (per thread; its first is 0)
        self._clear()
        while not self.stop_event.wait(float(self.monitor.sampling_interval)):
            self._sample()
        self._sample()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


#: The watcher of a stage process: waits for the stage to say "done" on its stdin; an end
#: of file without it means the stage died (SIGKILL, out of memory): the run is marked FAILED.
_WATCHER = """import sys
if sys.stdin.read() != "done":
    from attnlab.tracking import _stage_died
    _stage_died(*sys.argv[1:])
"""


def _stage_died(uri: str, run_id: str, stage: str, pid: str) -> None:
    """Mark ``run_id`` FAILED if the stage process ``pid`` was still the one logging into it."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    if run.info.status == "RUNNING" and run.data.tags.get(RUNNING_TAG) == f"{stage} (pid {pid})":
        client.set_tag(run_id, ERROR_TAG, f"{stage}: the stage process (pid {pid}) ended without finishing "
                                          "(killed: SIGKILL, SIGTERM, out of memory...)")
        client.delete_tag(run_id, RUNNING_TAG)
        client.set_terminated(run_id, "FAILED")


class LiveRun:
    """A pipeline state's MLflow run as one stage process logs into it (:func:`open_live_run`).

    Metrics go through a sender thread (:meth:`log_metrics`, :meth:`log_epoch`), so a
    store that is slow or down never stops the stage; artifacts and the end of the
    stage (:meth:`log_outputs`, :meth:`end_stage`, :meth:`fail`) are best effort: what
    fails is said once on stderr and left to the track stage, which logs whatever the
    run does not hold yet."""

    def __init__(self, client: MlflowClient, run_id: str, experiment: str, stage: str):
        self.client, self.run_id, self.experiment, self.stage = client, run_id, experiment, stage
        self.uri = client.tracking_uri
        self.said = False
        self.closed = False
        self.sender = _Sender(self, retry=float(os.environ.get("ATTNLAB_LIVE_RETRY", "5")))
        self.system: _SystemMetrics | None = None
        self.watcher: subprocess.Popen | None = None

    def trouble(self, err: BaseException) -> None:
        """Say once, in one line on stderr, that the store is not taking what this stage logs."""
        if not self.said:
            from tqdm.auto import tqdm

            self.said = True                   # tqdm.write: on a line of its own, above a progress bar
            tqdm.write(f"{self.stage}: MLflow ({self.uri}) is not answering ({_short(err)}); {self.stage} goes on, "
                       "its metrics are kept and sent when it answers again, and the track stage logs "
                       "whatever is still missing", file=sys.stderr)

    # ---------------------------------------------------------------- metrics
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, timestamp: int | None = None) -> None:
        now = int(time.time() * 1000) if timestamp is None else timestamp
        self.sender.put([Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def log_epoch(self, row: Mapping[str, Any], step_key: str = "epoch") -> None:
        """One row of a training history (``{"epoch": 3, "train_loss": ...}``), step = epoch,
        timestamp = now; a step the run already holds (a resumed training) is not logged again."""
        now = int(time.time() * 1000)
        step = int(row[step_key])
        self.sender.put([Metric(str(k), float(v), now, step) for k, v in row.items()
                         if k != step_key and isinstance(v, (int, float)) and v == v], once_per_step=True)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """While the block runs (training): system metrics are sampled (:meth:`system_metrics`)
        and a call to a tracking server fails at once when it does not answer, instead of
        MLflow's retries for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and a 10 s
        ``MLFLOW_HTTP_REQUEST_TIMEOUT``, unless set): the sender keeps the metrics and
        tries again every few seconds. Only the sender talks to the store meanwhile."""
        saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            with self.system_metrics():
                yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @contextlib.contextmanager
    def system_metrics(self) -> Iterator[None]:
        """Sample system metrics while the block runs (default every 10 s; a sample at the end)."""
        try:
            self.system = _SystemMetrics(self)
        except Exception as err:               # noqa: BLE001 - e.g. psutil missing: training goes on
            print(f"{self.stage}: no system metrics ({_short(err)})", file=sys.stderr)
            self.system = None
        try:
            yield
        finally:
            if self.system is not None:
                self.system.stop()
                self.system = None

    # ---------------------------------------------------------------- outputs and status
    def _best_effort(self, what: Callable[[], Any]) -> bool:
        try:
            what()
            return True
        except Exception as err:               # noqa: BLE001
            self.trouble(err)
            return False

    def log_outputs(self, *, metrics: Mapping[str, float] | None = None,
                    artifacts: Mapping[str, str | Path] | None = None) -> None:
        """A finished stage's metrics (step 0) and artifact directories (each tagged
        ``attnlab.logged.<dir>`` with its digest, so track does not upload it again)."""
        if metrics:
            self.log_metrics(metrics)
        for art_dir, path in (artifacts or {}).items():
            if Path(path).exists():
                digest = dir_digest(path)
                if self._best_effort(lambda: _log_artifacts(self.client, self.run_id, path, art_dir)):
                    self._best_effort(lambda: self.client.set_tag(self.run_id, LOGGED_TAG + art_dir, digest))

    def _flush(self, timeout: float) -> bool:
        sent = self.sender.close(timeout)
        if not sent:
            self.trouble(TimeoutError(f"metrics not sent within {timeout:g} s"))
        return sent

    def end_stage(self) -> None:
        """The stage succeeded: send what is pending; the run waits for the state's next
        stage as SCHEDULED (RUNNING means a stage is running)."""
        if self.closed:
            return
        self._flush(float(os.environ.get("ATTNLAB_LIVE_FLUSH", "20")))
        self._best_effort(lambda: self.client.delete_tag(self.run_id, RUNNING_TAG))
        self._best_effort(lambda: self.client.update_run(self.run_id, status="SCHEDULED"))
        self._close()

    def fail(self, message: str) -> None:
        """The stage failed: the run is FAILED, with ``<stage>: <message>`` as tag ``attnlab.error``."""
        if self.closed:
            return
        self._flush(5.0)
        self._best_effort(lambda: self.client.log_batch(self.run_id, tags=[
            mlflow.entities.RunTag(ERROR_TAG, f"{self.stage}: {message}"[:5000])]))
        self._best_effort(lambda: self.client.delete_tag(self.run_id, RUNNING_TAG))
        self._best_effort(lambda: self.client.set_terminated(self.run_id, "FAILED"))
        self._close()

    def finish(self, end_time: int | None) -> None:
        """The track stage: the run is complete (FINISHED at ``end_time``)."""
        if not self._flush(float(os.environ.get("ATTNLAB_LIVE_FLUSH", "20"))):
            raise RuntimeError(f"MLflow ({self.uri}) did not take the metrics of run {self.run_id}")
        self.client.delete_tag(self.run_id, RUNNING_TAG)
        self.client.set_terminated(self.run_id, "FINISHED", end_time=end_time)
        self._close()

    def discard(self) -> None:
        """This state was logged before by another run: this one is deleted."""
        self.sender.close(5.0)
        self.client.delete_tag(self.run_id, RUNNING_TAG)
        self.client.set_terminated(self.run_id, "KILLED")
        self.client.delete_run(self.run_id)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.watcher is not None and self.watcher.stdin is not None:
            with contextlib.suppress(OSError):
                self.watcher.stdin.write(b"done")
                self.watcher.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watcher.wait(5)

    def _watch(self) -> None:
        """Start the watcher process that marks the run FAILED if this process dies."""
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                           if p)}
        self.watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, self.uri, self.run_id, self.stage, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)           # a signal to the stage's process group spares it

    @contextlib.contextmanager
    def active(self) -> Iterator["LiveRun"]:
        """The block's :func:`current_run`."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def _supersede(client: MlflowClient, exp_id: str, exp_name: str, new: str) -> None:
    """Runs of the same experiment and DVC experiment name (the workspace's, or one queued
    experiment's) that wait for their next stage (SCHEDULED) will not get it: the state
    changed (params, code or data edited between stages). They end KILLED, with a tag
    naming the run that took over; running that state again resumes them."""
    query = f"attributes.status = 'SCHEDULED' and tags.`dvc.exp_name` = '{exp_name}'"
    for run in client.search_runs([exp_id], query, max_results=100):
        if run.info.run_id != new:
            client.set_tag(run.info.run_id, ERROR_TAG, f"superseded by run {new}: the pipeline state changed "
                                                       "before this one's track stage")
            client.set_terminated(run.info.run_id, "KILLED")


def open_live_run(experiment: str, *, key: str, params: Mapping[str, Any], stage: str,
                  start_time: int | Callable[[], int | None] | None = None, params_file: str | Path = "params.yaml",
                  root: Path | None = None) -> LiveRun | None:
    """Open the live run of the pipeline state ``key`` (:func:`live_key`) for ``stage``.

    The run of that key is resumed (RUNNING again, its error tag removed) when it is
    RUNNING or FAILED; else a new run is created RUNNING, with ``start_time`` (ms, or a
    function giving it, called only then: the state's first stage), the provenance tags, the run name of :func:`run_name` and
    ``params`` (logged once). None when the state's run is already FINISHED (an unchanged
    state is not logged twice: the track stage decides). Two processes that create the
    run of one key at once keep the older run and delete the other."""
    root = project_root(root)
    client = MlflowClient(tracking_uri(root))
    exp_id = experiment_id(client, experiment, root)
    query = f"tags.`{LIVE_TAG}` = '{key}'"

    def runs() -> list:
        found = client.search_runs([exp_id], query, max_results=50)
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    found = runs()
    if any(r.info.status == "FINISHED" for r in found):
        return None
    if not found:
        tags = {LIVE_TAG: key, **provenance_tags(root, experiment)}
        name = run_name(experiment, tags, changed_params(root, experiment, params_file))
        start = start_time() if callable(start_time) else start_time
        mine = client.create_run(exp_id, start_time=start, run_name=name, tags=tags).info.run_id
        param_rows = [mlflow.entities.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(param_rows), 100):
            client.log_batch(mine, params=param_rows[i:i + 100])
        found = runs()
        if not any(r.info.run_id == mine for r in found):
            found.append(client.get_run(mine))
        _supersede(client, exp_id, tags["dvc.exp_name"], mine)
    run, *others = found
    for other in others:                       # a race (or an older duplicate): one run per state
        if other.info.status != "FINISHED":
            client.set_terminated(other.info.run_id, "KILLED")
            client.delete_run(other.info.run_id)
    run_id = run.info.run_id
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    if ERROR_TAG in run.data.tags:
        client.delete_tag(run_id, ERROR_TAG)
    client.set_tag(run_id, RUNNING_TAG, f"{stage} (pid {os.getpid()})")
    live = LiveRun(client, run_id, experiment, stage)
    live._watch()
    return live


def main() -> None:
    """``python -m attnlab.tracking`` (``make store``): create the store; a tracking
    server that does not answer is one ``error:`` line on stderr and exit status 2."""
    import sys

    try:
        init_store()
    except ServerUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
