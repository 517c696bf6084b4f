"""Compare stage traces (see ``sitecustomize.py`` beside this file) with dvc.yaml.

Import: with ``tests/`` on ``sys.path`` (pytest's default rootdir/prepend import mode
puts it there for every test module in ``tests/``)::

    from stagetrace.check import declared_deps, load_traces, missing_traces, tracer_env, uncovered

``stagetrace`` is a namespace package (no ``__init__.py``). From a shell::

    python tests/stagetrace/check.py TRACE_DIR [dvc.yaml]     # exit 1 if anything is uncovered

Typical use: run the pipeline with ``env=tracer_env(trace_dir, src=<project>/src)``
(``dvc repro`` in a throw-away copy of the project), then
``traces = load_traces(trace_dir)``, ``assert not missing_traces(traces, dvc_yaml, experiments)``
and ``assert not uncovered(traces, dvc_yaml)``.

A trace's ``stage`` is its script's name (``stages/train.py`` -> ``train``), which is
the dvc.yaml stage name by this project's convention; with ``foreach`` the trace's
``experiment`` (the script's first argument) is the ``${item}``; a plain stage (``index``,
run without an experiment) has the experiment ``""``. Paths on both sides are relative
to the stage's working directory (the project root; ``wdir`` unused). A stage may read
what it writes itself: its declared ``outs`` and their ``attnlab.io.atomic_dir``
temporaries (``<parent>/.<name>.<pid>.<random>/``), e.g. to log its page to MLflow.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

#: The directory holding ``sitecustomize.py``: put it first on ``PYTHONPATH``.
SITE_DIR = Path(__file__).resolve().parent

#: Paths a stage may read without declaring them. A pattern ending in "/" exempts a
#: directory and everything below it; any other pattern is an fnmatch glob on the
#: root-relative path.
DEFAULT_EXEMPT: tuple[str, ...] = (
    # The MLflow store (SQLite file, its journal/WAL siblings, artifacts): the track
    # stage writes runs there; it is a side effect, never versioned, never a DVC
    # output, and not an input of any result.
    "mlflow.db", "mlflow.db-*", "mlartifacts/",
    # dvc.lock: the track stage reads it only for provenance tags it writes to MLflow.
    # DVC itself writes it after the stages run, so it cannot be a dep (a cycle).
    "dvc.lock",
    # The stages' recorded timings (data/<experiment>/.timings/<stage>.json, written by
    # attnlab.pipeline): the track stage reads them only for its run's start and end
    # time. They change at every run, so as a dep they would change dvc.lock each time.
    "data/*/.timings/*",
    # Version-control and DVC internals (git provenance, DVC's cache and temp dirs).
    ".git/", ".dvc/",
)


# ---------------------------------------------------------------------------- traces
def load_traces(trace_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``<stage>@<experiment>.<pid>.json`` in ``trace_dir``, sorted by stage,
    experiment and pid (a stage run twice leaves two traces)."""
    traces = []
    for path in sorted(Path(trace_dir).glob("*@*.json")):
        trace = json.loads(path.read_text())
        trace["file"] = str(path)
        traces.append(trace)
    return sorted(traces, key=lambda t: (t["stage"], t["experiment"], t["file"]))


def tracer_env(trace_dir: str | os.PathLike, *, src: str | os.PathLike | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that traces every stage script run under it into ``trace_dir``.

    ``src`` (e.g. a project copy's ``src``) goes on ``PYTHONPATH`` right after the
    tracer, so that copy's code wins over an editable install of the package."""
    env = dict(os.environ if base is None else base)
    entries = [str(SITE_DIR)] + ([str(src)] if src is not None else [])
    if env.get("PYTHONPATH"):
        entries.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["ATTNLAB_TRACE_DIR"] = str(trace_dir)
    return env


# ---------------------------------------------------------------------------- dvc.yaml
def _stage_bodies(dvc_yaml_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Stage name -> its definition (the ``do:`` body for a ``foreach`` stage)."""
    doc = yaml.safe_load(Path(dvc_yaml_path).read_text()) or {}
    bodies = {}
    for name, stage in (doc.get("stages") or {}).items():
        if "foreach" in stage:
            stage = stage.get("do") or {}
        elif "matrix" in stage:
            raise NotImplementedError(f"stage {name!r}: matrix stages are not supported")
        bodies[name] = stage
    return bodies


def _paths(entries: Iterable[Any] | None) -> list[str]:
    """dvc.yaml path entries: a string, or a one-key mapping ``{path: options}``."""
    out = []
    for entry in entries or []:
        if isinstance(entry, Mapping):
            out.extend(str(k) for k in entry)
        else:
            out.append(str(entry))
    return out


def declared_deps(dvc_yaml_path: str | os.PathLike) -> dict[str, list[str]]:
    """Per stage name, its ``deps`` as written (``${item}`` left as a template)."""
    return {name: _paths(body.get("deps")) for name, body in _stage_bodies(dvc_yaml_path).items()}


def declared_outs(dvc_yaml_path: str | os.PathLike) -> dict[str, list[str]]:
    """Per stage name, its ``outs`` as written (``${item}`` left as a template)."""
    return {name: _paths(body.get("outs")) for name, body in _stage_bodies(dvc_yaml_path).items()}


def declared_params_files(dvc_yaml_path: str | os.PathLike) -> dict[str, list[str]]:
    """Per stage name, the parameter files its ``params`` section tracks: a plain key
    (``${item}.train``) is a key of ``params.yaml``; ``{file: [keys]}`` names the file."""
    out = {}
    for name, body in _stage_bodies(dvc_yaml_path).items():
        files: list[str] = []
        for entry in body.get("params") or []:
            for f in ([str(k) for k in entry] if isinstance(entry, Mapping) else ["params.yaml"]):
                if f not in files:
                    files.append(f)
        out[name] = files
    return out


def missing_traces(traces: Iterable[Mapping[str, Any]], dvc_yaml_path: str | os.PathLike,
                   experiments: Iterable[str], externals: Mapping[str, str] | None = None) -> list[str]:
    """``stage@experiment`` of every foreach stage x experiment without a trace (a stage
    that did not run, or ran without the tracer), plus plain stages without one.
    ``externals`` (params.yaml's, name -> directory) are the items of the
    ``foreach: ${externals}`` stages; the others iterate over ``experiments``."""
    doc = yaml.safe_load(Path(dvc_yaml_path).read_text()) or {}
    have = {(_dvc_stage(t, externals), t["experiment"]) for t in traces}
    have_stage = {t["stage"] for t in traces}
    out = []
    for name, stage in (doc.get("stages") or {}).items():
        if "foreach" in stage:
            items = (externals or {}) if stage["foreach"] == "${externals}" else experiments
            out += [f"{name}@{e}" for e in items if (name, e) not in have]
        elif name not in have_stage:
            out.append(name)
    return out


def _dvc_stage(trace: Mapping[str, Any], externals: Mapping[str, str] | None) -> str:
    """The dvc.yaml stage of a trace: ``external-<script>`` for an external instance."""
    return f"external-{trace['stage']}" if trace["experiment"] in (externals or {}) else trace["stage"]


# ---------------------------------------------------------------------------- checking
def _norm(path: str) -> str:
    path = os.path.normpath(path).replace(os.sep, "/")
    return "" if path == "." else path


def _covers(dep: str, path: str) -> bool:
    """A dep covers a path equal to it or inside it (a directory dep)."""
    return dep == "" or path == dep or path.startswith(dep + "/")


def _resolve(template: str, experiment: str, externals: Mapping[str, str] | None) -> str:
    """A dvc.yaml path of a trace's stage: for an instance of ``externals`` ``${key}`` is its
    name and ``${item}`` its directory, otherwise ``${item}`` is the experiment."""
    if experiment in (externals or {}):
        return _norm(template.replace("${key}", experiment).replace("${item}", externals[experiment]))
    return _norm(template.replace("${item}", experiment))


def _own_output(path: str, outs: Iterable[str]) -> bool:
    """``path`` is inside one of the stage's ``outs`` or in the atomic_dir temporary of one."""
    for out in outs:
        parent, _, name = out.rpartition("/")
        if _covers(out, path) or path.startswith(f"{parent}/.{name}." if parent else f".{name}."):
            return True
    return False


def _exempt(path: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/"):
            if _covers(_norm(pattern), path):
                return True
        elif fnmatch.fnmatchcase(path, pattern):
            return True
    return False


def uncovered(traces: Iterable[Mapping[str, Any]], dvc_yaml_path: str | os.PathLike,
              exempt: Iterable[str] = DEFAULT_EXEMPT, externals: Mapping[str, str] | None = None) -> list[str]:
    """One message per (stage@experiment, path) read or ran but not declared.

    A path is covered by a dep equal to it or by a directory dep containing it, after
    ``${item}`` is replaced by the trace's experiment (for an instance of ``externals``,
    the stage is ``external-<script>``, ``${key}`` its name and ``${item}`` its
    directory); a parameter file (``params.yaml``)
    by the stage's ``params`` section; a read of the stage's own ``outs`` (or of their
    atomic_dir temporaries) is the stage reading what it wrote; ``exempt`` patterns (see
    :data:`DEFAULT_EXEMPT`) are never reported. Messages are ordered as the stages in dvc.yaml, then by
    experiment, then ``read`` before ``ran``, then path.
    """
    deps = declared_deps(dvc_yaml_path)
    outs = declared_outs(dvc_yaml_path)
    params = declared_params_files(dvc_yaml_path)
    order = {name: i for i, name in enumerate(deps)}
    exempt = tuple(exempt)
    found: set[tuple] = set()
    for trace in traces:
        stage, experiment = _dvc_stage(trace, externals), trace["experiment"]
        where = f"{stage}@{experiment}" if experiment else stage
        if stage not in deps:
            found.add((len(order), stage, experiment, "", "",
                       f"{where} ran stages/{trace['stage']}.py, but dvc.yaml has no stage {stage!r}"))
            continue
        covering = [_resolve(d, experiment, externals) for d in deps[stage]]
        own = [_resolve(o, experiment, externals) for o in outs[stage]]
        param_files = {_norm(p) for p in params[stage]}
        for verb in ("read", "ran"):
            for path in trace.get(verb, []):
                path = _norm(path)
                if _exempt(path, exempt) or any(_covers(d, path) for d in covering):
                    continue
                if verb == "read" and (path in param_files or _own_output(path, own)):
                    continue
                found.add((order[stage], stage, experiment, verb, path,
                           f"{where} {verb} {path}, which its deps do not declare"))
    return [entry[-1] for entry in sorted(found, key=lambda e: (e[0], e[2], e[3] != "read", e[4]))]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python tests/stagetrace/check.py TRACE_DIR [dvc.yaml]", file=sys.stderr)
        return 2
    traces = load_traces(args[0])
    if not traces:
        print(f"no traces in {args[0]}", file=sys.stderr)
        return 2
    dvc_yaml = Path(args[1] if len(args) > 1 else "dvc.yaml")
    params = yaml.safe_load((dvc_yaml.parent / "params.yaml").read_text()) or {}
    messages = uncovered(traces, dvc_yaml, externals=params.get("externals"))
    for message in messages:
        print(message)
    stages = sorted({f"{t['stage']}@{t['experiment']}" if t["experiment"] else t["stage"] for t in traces})
    print(f"{len(messages)} undeclared; {len(traces)} traces of {len(stages)} stage runs", file=sys.stderr)
    return 1 if messages else 0


if __name__ == "__main__":
    raise SystemExit(main())
