"""One page over every experiment of a pipeline state: ``reports/index.html``.

For each experiment the pipeline runs (params.yaml's ``experiments``, then its
``externals``): the headline metrics, the explanation-quality table of its methods (the
best of each column marked), a link to its report, its params, and its last MLflow runs
with this state's run marked and compared with the run before it. Above them, the git
commit that produced the state. The page is one self-contained file (it requests nothing;
every text that comes from params, metrics or MLflow is escaped), written atomically; the
``index`` stage (``stages/index.py``, :func:`main`) also logs it to every run it covers
(artifact ``index/index.html``).

It lives in ``reports/``, not under ``data/``: the stage depends on the whole ``data``
directory (every experiment's outputs, however many experiments there are), and a
stage's output cannot lie inside one of its dependencies. For the same reason the stage
writes nothing under ``data/`` (no timing record either), or it would always be stale.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from attnlab import io
from attnlab.config import ConfigError, Params, load_params
from attnlab.io import DataError, ServerUnreachable, atomic_dir, require_tracking_server
from attnlab.layout import Layout
from attnlab.report.classifier import method_table
from attnlab.report.html import HtmlReport

#: The scored columns of :func:`~attnlab.report.classifier.method_table` shown here, and
#: which way is better; their intervals are shown too, the p-values and pointing game not.
BETTER = {"deletion AUC (lower better)": "min", "insertion AUC (higher better)": "max", "evidence AUROC": "max"}
#: Training metrics shown in the overview (train/metrics.json key -> column), when present.
HEADLINE = {"test_accuracy": "test accuracy", "test_macro_f1": "test macro-F1", "test_perplexity": "test perplexity"}
_STYLE = ("table{display:block;overflow-x:auto}td.best{font-weight:bold;background:#e6f4de}"   # wide tables scroll
          "details{margin:.5em 0}pre{background:#f6f6f6;padding:.5em}")


@dataclass
class Covered:
    """One experiment instance on the page, with what its stages wrote."""
    name: str
    kind: str
    section: Any                 # its validated params section
    external: bool               # a model trained elsewhere (no train stage)
    metrics: dict[str, Any]      # evaluate/metrics.json
    train: dict[str, Any] | None  # train/metrics.json (None for an external model)
    run_id: str                  # track/run.json: the MLflow run of this state
    report: Path                 # report/report.html


def _read_json(name: str, path: Path) -> dict[str, Any]:
    try:
        data = io.read_json(path)
    except FileNotFoundError:
        raise DataError(f"{name}: {path} is missing (its stages have not run: dvc repro)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{name}: {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{name}: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def covered(params: Params, data: Path) -> list[Covered]:
    """The experiments of ``params`` and their files under ``data``; a missing or malformed
    file raises :class:`~attnlab.io.DataError` naming the experiment and the file."""
    out = []
    for name in [*params.experiments, *params.externals]:
        lay = Layout(Path(data) / name)
        external = name in params.externals
        metrics = _read_json(name, lay.metrics)
        for key in ("deletion_auc", "insertion_auc"):
            if not isinstance(metrics.get("faithfulness", {}).get(key), dict):
                raise DataError(f"{name}: {lay.metrics} has no 'faithfulness.{key}' (expected {{method: AUC}})")
        train = None if external else _read_json(name, lay.train_metrics)
        run = _read_json(name, lay.run)
        if not isinstance(run.get("run_id"), str):
            raise DataError(f"{name}: {lay.run} has no 'run_id' (expected the MLflow run id, a string)")
        if not lay.report.is_file():
            raise DataError(f"{name}: {lay.report} is missing (its report stage has not run: dvc repro)")
        out.append(Covered(name, params.kind(name), params.experiment(name), external, metrics, train,
                           run["run_id"], lay.report))
    return out


# --------------------------------------------------------------------------- tables
def best_cells(table: pd.DataFrame) -> set[tuple[int, str]]:
    """``(row, column)`` of the best value of each :data:`BETTER` column (every tie),
    among the methods; the random baseline is never marked."""
    candidates = (table["method"] != "random").to_numpy()
    marked: set[tuple[int, str]] = set()
    for column, how in BETTER.items():
        if column not in table:
            continue
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        values = np.where(candidates, values, np.nan)
        if np.isnan(values).all():
            continue
        best = np.nanmin(values) if how == "min" else np.nanmax(values)
        marked |= {(int(r), column) for r in np.flatnonzero(values == best)}
    return marked


def quality_table(metrics: dict[str, Any]) -> tuple[pd.DataFrame, set[tuple[int, str]]]:
    """The methods ranked by deletion AUC (the report's :func:`method_table`) with their
    intervals, evidence AUROC where there is ground truth, and whether each passed the
    randomisation test; and the cells to mark (:func:`best_cells`)."""
    table = method_table(metrics)
    table = table[[c for c in table.columns if "p vs random" not in c and not c.startswith("pointing game")]].copy()
    passed = metrics.get("sanity", {}).get("passed")
    if passed:
        table["sanity check"] = [("passes" if passed[m] else "FAILS") if m in passed else "–" for m in table["method"]]
    return table, best_cells(table)


def best_methods(table: pd.DataFrame, marked: set[tuple[int, str]]) -> list[str]:
    """The methods marked best by deletion AUC (several when tied)."""
    column = next(iter(BETTER))
    return [table["method"].iloc[r] for r, c in sorted(marked) if c == column]


def _when(ms: int | None) -> str:
    return "–" if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _accuracy_key(entry: Covered) -> tuple[str, str]:
    """The MLflow metric of the test accuracy and its column title (an external model has
    no training: its accuracy is on the inputs it was explained on)."""
    return ("evaluate.accuracy", "accuracy") if entry.external else ("final.test_accuracy", "test accuracy")


def runs_table(entry: Covered, runs: list[dict[str, Any]], best: str | None) -> pd.DataFrame:
    """One row per MLflow run of :func:`attnlab.tracking.recent_runs`: its name, start,
    commit, test accuracy and the deletion AUC of this state's best method ``best`` ("–":
    not logged by that run, e.g. the method was not run then)."""
    key, title = _accuracy_key(entry)
    rows = []
    for run in runs:
        row = {"": "this state" if run["run_id"] == entry.run_id else "", "run": run["name"],
               "started (UTC)": _when(run["start_time"]), "commit": (run["commit"] or "–")[:7],
               title: run["metrics"].get(key, "–")}
        if best is not None:
            row[f"deletion AUC ({best})"] = run["metrics"].get(f"evaluate.faithfulness.deletion_auc.{best}", "–")
        rows.append(row | {"run id": run["run_id"]})
    return pd.DataFrame(rows)


def delta_sentence(entry: Covered, runs: list[dict[str, Any]], best: str | None) -> str:
    """This state's run against the run that started just before it."""
    if not runs:
        return "No earlier runs: the MLflow store has no finished run of this experiment."
    current = next((r for r in runs if r["run_id"] == entry.run_id), None)
    if current is None:
        return (f"This state's run {entry.run_id} (track/run.json) is not in the MLflow store, so it cannot be "
                "compared with the earlier runs.")
    earlier = [r for r in runs if r["start_time"] < current["start_time"]]
    if not earlier:
        return "No earlier runs: this state's run is the experiment's first."
    before = max(earlier, key=lambda r: r["start_time"])
    key, title = _accuracy_key(entry)
    keys = [(title, key, "higher")]
    if best is not None:
        keys.append((f"deletion AUC of {best}", f"evaluate.faithfulness.deletion_auc.{best}", "lower"))
    parts = []
    for what, key, better in keys:
        now, then = current["metrics"].get(key), before["metrics"].get(key)
        if now is None or then is None:
            parts.append(f"{what}: {'–' if now is None else f'{now:.3f}'} (not logged by "
                         f"{'this run' if now is None else 'the earlier run'})")
        else:
            parts.append(f"{what} {now:.3f} ({now - then:+.3f}; {better} is better)")
    return (f"This state's run ({current['name']}) against the run before it ({before['name']}, started "
            f"{_when(before['start_time'])} UTC): " + "; ".join(parts) + ".")


def _href(target: Path, out: Path) -> str:
    """``target`` relative to the directory ``out``, as a URL path (every character that
    is not safe in a URL quoted, e.g. an instance name's). Symbolic links are not followed:
    with DVC's symlink cache the report itself links into .dvc/cache, which must not leak."""
    return urllib.parse.quote(Path(os.path.relpath(os.path.abspath(target), os.path.abspath(out))).as_posix())


def _overview(entries: list[Covered], tables: dict[str, tuple[pd.DataFrame, set]]) -> pd.DataFrame:
    rows = []
    for e in entries:
        table, marked = tables[e.name]
        best = best_methods(table, marked)
        row = {"experiment": e.name, "kind": e.kind}
        if e.external:
            row["test accuracy"] = e.metrics.get("accuracy", np.nan)
        else:
            row.update({title: e.train.get(key, np.nan) for key, title in HEADLINE.items()})
        deletion = e.metrics["faithfulness"]["deletion_auc"]
        row["best method (deletion AUC)"] = ", ".join(best) or "–"
        row["its deletion AUC"] = deletion[best[0]] if best else np.nan
        row["random's deletion AUC"] = deletion.get("random", np.nan)
        if "sanity check" in table:
            checked = table[table["sanity check"] != "–"]
            row["sanity check passed"] = f"{(checked['sanity check'] == 'passes').sum()} of {len(checked)}"
        rows.append(row | {"MLflow run": e.run_id})
    frame = pd.DataFrame(rows)
    return frame[[c for c in frame.columns if not frame[c].isna().all()]] if rows else frame


# --------------------------------------------------------------------------- the page
def _provenance(rep: HtmlReport, params: Params, root: Path) -> None:
    """Which commit, DVC experiment and device made this state, and where its runs are."""
    import attnlab.tracking as tracking

    tags = tracking.provenance_tags(Path(root), "index")
    commit = tags.get("git.commit")
    if commit:
        branch = tags.get("mlflow.source.git.branch")
        source = (f"Git commit {commit}" + (f" (branch {branch})" if branch else "")
                  + (", with uncommitted changes to tracked files" if tags.get("git.dirty") == "True"
                     else ", work tree clean"))
    else:
        source = "Not a git work tree: no commit"
    rep.paragraph(f"{source}; DVC experiment: {tags['dvc.exp_name']}; device: {params.device}. "
                  f"Written {_when(int(datetime.now(timezone.utc).timestamp() * 1000))} UTC. "
                  f"MLflow: {tracking.tracking_uri(root)} (this page is an artifact, index/index.html, "
                  f"of every run below).")


def _experiment(rep: HtmlReport, params: Params, e: Covered, quality: tuple[pd.DataFrame, set], link: str,
                root: Path, runs: int) -> None:
    """One experiment's section: its report, methods, MLflow runs and params."""
    import attnlab.tracking as tracking

    table, marked = quality
    best = (best_methods(table, marked) or [None])[0]
    rep.heading(f"{e.name} ({e.kind})")
    rep.link(f"The report of {e.name}", link)
    rep.paragraph("Explanation quality: deletion AUC (lower is better) and insertion AUC (higher is better) "
                  "with their 95% bootstrap intervals, evidence AUROC against the planted ground truth "
                  "(where there is one; higher is better) and the randomisation sanity check. ★ marks the "
                  "best method of each column (random is the baseline, never marked).")
    rep.table(table, marked=marked)
    found = tracking.recent_runs(e.name, runs, root, current=e.run_id)
    if found:
        rep.paragraph(f"The MLflow runs of {e.name}, newest first: the last {runs} at most"
                      + (", then this state's run (older) and the run before it:" if len(found) > runs else ":"))
        rep.table(runs_table(e, found, best))
    rep.paragraph(delta_sentence(e, found, best))
    section = {"kind": e.kind, **e.section.model_dump(mode="json")}
    if e.external:
        section["directory"] = params.externals[e.name]
    rep.details(f"params of {e.name} (validated, defaults filled in)",
                yaml.safe_dump({e.name: section}, sort_keys=False, allow_unicode=True))


def render(params: Params, entries: list[Covered], root: Path, out: Path, *, runs: int = 5) -> str:
    """The page of ``entries`` (:func:`covered`), to be written into the directory ``out``
    (links are relative to it); ``runs`` earlier MLflow runs per experiment."""
    rep = HtmlReport("attnlab — every experiment of this pipeline state", style=_STYLE)
    _provenance(rep, params, root)
    if not entries:
        rep.paragraph("params.yaml lists no experiments and no externals.", css="warn")
        return rep.html()
    quality = {e.name: quality_table(e.metrics) for e in entries}
    links = [_href(e.report, out) for e in entries]
    rep.heading("Overview")
    rep.paragraph("One row per experiment: its held-out metrics (an external model's accuracy is on the inputs "
                  "it was explained on), the method whose explanations are most faithful by deletion AUC (lower "
                  "is better; random ranks items at random), how many methods pass the model-randomisation "
                  "sanity check, and the MLflow run of this state. The name opens the experiment's report "
                  "(when this file is opened from the project's reports/ directory).")
    rep.table(_overview(entries, quality), links={"experiment": links})
    from attnlab.report import figures

    rep.figure(figures.method_ranking({e.name: e.metrics for e in entries}), "ranking",
               "Every method of every experiment, best first: deletion AUC (lower is better) and, where the data "
               "have planted ground truth, evidence AUROC (higher is better), each with its 95% bootstrap interval "
               "over the explained samples; the dashed line is the random baseline. Overlapping intervals mean "
               "the data do not separate those methods.")
    for e, link in zip(entries, links):
        _experiment(rep, params, e, quality[e.name], link, root, runs)
    return rep.html()


def build_index(params: Params, root: str | Path, *, data: str | Path = "data", out: str | Path = "reports",
                runs: int = 5) -> str:
    """The page over every experiment of ``params``, whose outputs are in ``root/data``,
    as it is written into ``root/out``."""
    root = Path(root)
    return render(params, covered(params, root / data), root, root / out, runs=runs)


def write_index(params: Params, root: str | Path, *, data: str | Path = "data", out: str | Path = "reports",
                runs: int = 5, log: bool = True) -> Path:
    """Write :func:`build_index`'s page to ``root/out/index.html`` atomically and (``log``)
    log it to the MLflow run of every experiment it covers. Bad input (a missing metrics
    or run file, a run the store does not hold) raises :class:`~attnlab.io.DataError`
    naming the experiment and the file: nothing is written and nothing is logged."""
    import attnlab.tracking as tracking

    root = Path(root)
    entries = covered(params, root / data)
    page = render(params, entries, root, root / out, runs=runs)
    with atomic_dir(root / out) as tmp:
        (tmp / "index.html").write_text(page)
        if log:
            try:
                tracking.log_artifact_to_runs([e.run_id for e in entries], tmp / "index.html", "index", root)
            except tracking.NoSuchRun as err:
                missing = [e for e in entries if e.run_id in err.run_ids]
                files = ", ".join(str(Layout(root / data / e.name).run) for e in missing)
                stages = " ".join(f"{'external-' if e.external else ''}track@{e.name}" for e in missing)
                raise DataError(f"{', '.join(e.name for e in missing)}: {err} (named by {files}); log the "
                                f"state again: dvc repro --force {stages}") from None
    return root / out / "index.html"


def main(argv: list[str] | None = None) -> int:
    """``python stages/index.py [--params FILE] [--data DIR] [--out DIR] [--runs N]``: write
    the page and log it; bad input is one ``error:`` line on stderr and exit status 2."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = argparse.ArgumentParser(prog="stages/index.py", description="attnlab 'index' stage: one page over "
                                     "every experiment, logged to each one's MLflow run")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--runs", type=int, default=5, help="earlier MLflow runs shown per experiment")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: expected a number of runs >= 1, got {args.runs}")
    try:
        require_tracking_server()
        params = load_params(args.params)
        path = write_index(params, Path("."), data=args.data, out=args.out, runs=args.runs)
    except (ServerUnreachable, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; logged to the MLflow runs of {', '.join([*params.experiments, *params.externals])}")
    return 0
