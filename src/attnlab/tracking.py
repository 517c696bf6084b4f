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
* A run is logged completely or not at all: on any error it is marked FAILED and
  deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Metric, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from attnlab.io import ServerUnreachable, hash_file, require_tracking_server  # noqa: E402

STATE_TAG = "attnlab.state_key"
#: MLflow 3's experiment kind (the UI's "Machine learning" vs "GenAI apps & agents").
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
#: The UI's own guesses, which an explicit kind replaces (a user's explicit choice stays).
_INFERRED_KINDS = ("", "no_inferred_type", "custom_model_development_inferred", "genai_development_inferred")


def project_root(start: str | Path | None = None) -> Path:
    """The project directory, seen through DVC's temporary experiment copies."""
    if os.environ.get("ATTNLAB_ROOT"):
        return Path(os.environ["ATTNLAB_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for parent in [here, *here.parents]:
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return here


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


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
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
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
    """
    root = project_root(root)
    client = MlflowClient(tracking_uri(root))
    files = list(files)
    key = state_key(params, files)
    exp_id = experiment_id(client, experiment, root)
    found = client.search_runs([exp_id], filter_string=f"tags.`{STATE_TAG}` = '{key}'", max_results=10)
    for run in found:
        if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            return run.info.run_id, False
        client.delete_run(run.info.run_id)   # a crashed earlier attempt

    tags = {STATE_TAG: key, **provenance_tags(root, experiment), **_timing_tags(start_time, untimed),
            **{f"attnlab.stage.{stage}": _stage_tag(record) for stage, record in (stages or {}).items()}}
    name = run_name(experiment, tags, changed_params(root, experiment, Path.cwd() / "params.yaml"))
    run = client.create_run(exp_id, start_time=start_time, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        if dataset is not None:
            client.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(
                dataset_entity(dataset, dataset_name or Path(dataset).stem),
                tags=[mlflow.entities.InputTag("mlflow.data.context", "training")])])
        metric_rows = _history_metrics(history, history_step) if history is not None else []
        now = int(time.time() * 1000)
        metric_rows += [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        param_rows = [mlflow.entities.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(param_rows), 100):      # log_batch takes <= 100 params, 1000 metrics
            client.log_batch(run_id, params=param_rows[i:i + 100])
        for i in range(0, len(metric_rows), 1000):
            client.log_batch(run_id, metrics=metric_rows[i:i + 1000])
        for art_dir, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(run_id, str(path), art_dir)
            else:
                client.log_artifact(run_id, str(path), art_dir)
        if model is not None:
            _log_model(client, run_id, model, model_example)
        client.set_terminated(run_id, "FINISHED", end_time=end_time)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.delete_run(run_id)
        raise
    return run_id, True


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


def _missing_sqlite(uri: str) -> bool:
    """A SQLite store whose file does not exist (MLflow's client would create it)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


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
    if _missing_sqlite(uri):
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
    if _missing_sqlite(uri):
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
