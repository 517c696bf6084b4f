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

from attnlab.io import hash_file  # noqa: E402

STATE_TAG = "attnlab.state_key"


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
    """Create (or upgrade) the store once, before any parallel use."""
    uri = uri or tracking_uri()
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


def experiment_id(client: MlflowClient, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (root / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def state_key(params: Mapping[str, Any], files: Iterable[str | Path]) -> str:
    """sha256 of the params and of the content of ``files`` (the recorded outputs)."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in files):
        h.update(str(path).encode())
        hash_file(h, path)
    return h.hexdigest()


def provenance_tags(root: Path, experiment: str) -> dict[str, str]:
    """Git commit, DVC experiment name and the dvc.lock hashes of this experiment's stages."""
    tags = {"attnlab.experiment": experiment,
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "HEAD")
    if head.returncode == 0:
        tags["mlflow.source.git.commit"] = tags["git.commit"] = head.stdout.strip()
        tags["git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip()))
    lock = Path.cwd() / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for name, entry in stages.items():
            if name.endswith(f"@{experiment}"):
                outs = json.dumps(entry.get("outs", []), sort_keys=True)
                tags[f"dvc.lock.{name.split('@')[0]}"] = hashlib.md5(outs.encode()).hexdigest()[:12]
    return tags


def flat_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``prefix.a.b`` keys (others skipped)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
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
                     artifacts: Mapping[str, str | Path] | None = None,
                     root: Path | None = None) -> tuple[str, bool]:
    """Log one pipeline state of ``experiment`` as one MLflow run.

    ``params`` are logged once; ``history`` (one row per step) as metric histories;
    ``metrics`` as final values; ``model`` as a pickled torch module (loadable as its
    original class); ``artifacts`` maps an artifact directory to a local file or
    directory. ``files`` are the outputs whose content (with ``params``) identifies
    the state. Returns ``(run_id, created)``: an identical state returns the existing
    run and logs nothing.
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

    tags = {STATE_TAG: key, **provenance_tags(root, experiment)}
    run = client.create_run(exp_id, run_name=f"{tags['dvc.exp_name']}-{key[:8]}", tags=tags)
    run_id = run.info.run_id
    try:
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
            _log_model(client, run_id, model)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.delete_run(run_id)
        raise
    return run_id, True


def _log_model(client: MlflowClient, run_id: str, model: Any) -> None:
    import torch
    import mlflow.pytorch

    package = Path(__file__).resolve().parent
    mlflow.set_tracking_uri(client.tracking_uri)
    # pickle is chosen knowingly (pt2 reloads a GraphModule, on which hooks never fire)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle",   # pt2 reloads a GraphModule
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            code_paths=[str(package)])
    # start_run(run_id=...) ends the run FINISHED on exit; the caller decides the final status
    client.update_run(run_id, status="RUNNING")


def find_runs(experiment: str, root: Path | None = None) -> pd.DataFrame:
    """The experiment's runs as a DataFrame (params, metrics, tags), newest first."""
    root = project_root(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])
