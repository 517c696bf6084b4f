"""The index page over every experiment (issue #18): built from small hand-written stage
outputs and a real SQLite MLflow store in a temporary project; every expected number is
computed here from the fixture's own values."""
from __future__ import annotations

import contextlib
import copy
import html
import json
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from attnlab import tracking
from attnlab.config import load_params
from attnlab.report.index import build_index, main

ROOT = Path(__file__).resolve().parents[1]
#: markup, a script and both quotes: wherever it comes from, the page shows it as text
EVIL = "<script>window.__pwned=1</script>\"'"
#: an instance name with markup and quotes (no "/": it names a directory)
ODD = "m<i>\"'&"

#: evaluate/metrics.json per experiment. motion: random has the smallest deletion AUC (it
#: is the baseline, never "best"); ODD: two methods tie on deletion AUC, a method name
#: is markup; tokens: evidence AUROC and a failed sanity check; ext: a model trained elsewhere.
METRICS = {
    "motion": {"accuracy": 0.9, "faithfulness": {
        "deletion_auc": {"raw": 0.42, "rollout": 0.31, "grad_rollout": 0.27, "random": 0.2},
        "insertion_auc": {"raw": 0.61, "rollout": 0.77, "grad_rollout": 0.70, "random": 0.8},
        "deletion_auc_ci": {m: {"lo": v - 0.05, "hi": v + 0.05} for m, v in
                            {"raw": 0.42, "rollout": 0.31, "grad_rollout": 0.27, "random": 0.2}.items()}},
        "sanity": {"passed": {"raw": True, "rollout": True, "grad_rollout": False}}},
    ODD: {"accuracy": 0.5, "faithfulness": {
        "deletion_auc": {"raw": 0.35, EVIL: 0.25, "rollout": 0.25, "random": 0.5},
        "insertion_auc": {"raw": 0.6, EVIL: 0.65, "rollout": 0.55, "random": 0.5}}},
    "tokens": {"faithfulness": {
        "deletion_auc": {"raw": 0.06, "rollout": 0.05, "received": 0.07, "random": 0.14},
        "insertion_auc": {"raw": 0.77, "rollout": 0.93, "received": 0.81, "random": 0.73}},
        "evidence": {"auroc": {"raw": 0.38, "rollout": 0.93, "received": 0.94, "random": 0.5}},
        "sanity": {"passed": {"raw": True, "rollout": True, "received": False}}},
    "ext": {"accuracy": 0.625, "faithfulness": {
        "deletion_auc": {"rollout": 0.4, "raw": 0.45, "random": 0.6},
        "insertion_auc": {"rollout": 0.7, "raw": 0.6, "random": 0.5}}},
}
TRAIN = {"motion": {"test_accuracy": 0.875, "test_macro_f1": 0.813},
         ODD: {"test_accuracy": 0.5, "test_macro_f1": 0.4375},
         "tokens": {"test_accuracy": 0.25, "test_perplexity": 17.5}}
#: the earlier run of motion: what this state is compared with
EARLIER = {"final.test_accuracy": 0.75, "evaluate.faithfulness.deletion_auc.grad_rollout": 0.314}
START = 1_700_000_000_000


def _params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = ["motion", ODD, "tokens"]
    params[ODD] = {"kind": "motion", **copy.deepcopy(params["motion"])}
    params["tokens"]["prepare"].update(source="file", path=f"corpus/{EVIL}.txt")
    params["externals"] = {"ext": "ext"}
    params["ext"] = {"kind": "external", "model": {"factory": "ext/model.py:make_model", "weights": "ext/model.pt"},
                     "prepare": {"inputs": ["ext/x.npy"], "labels": "ext/y.npy"}, "extract": {}, "aggregate": {},
                     "explain": {}, "evaluate": {}, "report": {}}
    for name in ("video", "frames", "fusion"):
        del params[name]
    return params


def make_project(root: Path) -> Path:
    """In ``root``: params.yaml, every covered experiment's metrics, run and report files,
    and the MLflow store (``root/mlflow.db``) holding their runs (motion: an earlier one
    too). Run with ``ATTNLAB_ROOT=root``, no ``MLFLOW_TRACKING_URI``, inside ``root``."""
    (root / "params.yaml").write_text(yaml.safe_dump(_params(), sort_keys=False, allow_unicode=True))
    tracking.init_store()
    earlier = root / "earlier.json"
    earlier.write_text(json.dumps(EARLIER))
    tracking.log_pipeline_run("motion", params={"train.epochs": 3}, metrics=EARLIER, files=[earlier],
                              start_time=START, end_time=START + 1000)
    for i, (name, evaluated) in enumerate(METRICS.items()):
        data = root / "data" / name
        for stage in ("evaluate", "train", "track", "report"):
            (data / stage).mkdir(parents=True)
        (data / "evaluate" / "metrics.json").write_text(json.dumps(evaluated))
        metrics = tracking.flat_metrics(evaluated, "evaluate")
        if name in TRAIN:
            (data / "train" / "metrics.json").write_text(json.dumps(TRAIN[name]))
            metrics |= {f"final.{k}": v for k, v in TRAIN[name].items()}
        (data / "report" / "report.html").write_text(f"<!DOCTYPE html><title>{html.escape(name)}</title>"
                                                     f"<p>the report of {html.escape(name)}</p>")
        run_id, _ = tracking.log_pipeline_run(name, params={"train.epochs": 4}, metrics=metrics,
                                              files=[data / "evaluate" / "metrics.json"],
                                              start_time=START + 10_000 * (i + 1), end_time=START + 10_000 * (i + 2))
        (data / "track" / "run.json").write_text(json.dumps({"experiment": name, "run_id": run_id}))
    return root


@contextlib.contextmanager
def in_project(root: Path):
    """The environment of a stage run in ``root``, with its own store."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_ROOT", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(name, raising=False)
        mp.chdir(root)
        yield root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    with in_project(root):
        return make_project(root)


@pytest.fixture
def inside(project):
    """Work in the project, with its store."""
    with in_project(project):
        yield project


def _run_id(root: Path, name: str) -> str:
    return json.loads((root / "data" / name / "track" / "run.json").read_text())["run_id"]


# --------------------------------------------------------------------------- reading the page
class Page(HTMLParser):
    """The page's h2 headings and tables: each table with the heading above it, its header
    and its cells as ``{"text", "class", "href"}``; ``text`` is every text node."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self._heading, self._in_h2, self._cell = "", False, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "h2":
            self._in_h2, self._heading = True, ""
        elif tag == "table":
            self.tables.append({"heading": self._heading, "header": [], "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = {"text": "", "class": attrs.get("class"), "href": None, "tag": tag}
        elif tag == "a" and self._cell is not None:
            self._cell["href"] = attrs.get("href")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th") and self._cell is not None:
            cell, self._cell = self._cell, None
            cell["text"] = cell["text"].strip()
            if cell["tag"] == "th":
                self.tables[-1]["header"].append(cell["text"])
            else:
                self.tables[-1]["rows"][-1].append(cell)

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self._heading += data
        if self._cell is not None:
            self._cell["text"] += data

    def table(self, heading: str, first_column: str) -> list[dict[str, dict]]:
        """The rows (column -> cell) of the table under ``heading`` whose first column is ``first_column``."""
        for t in self.tables:
            if t["heading"] == heading and t["header"] and t["header"][0] == first_column:
                return [dict(zip(t["header"], row)) for row in t["rows"] if row]
        raise AssertionError(f"no table {first_column!r} under {heading!r}: {[(t['heading'], t['header']) for t in self.tables]}")


def _number(cell: dict) -> float:
    return float(cell["text"].replace("★", "").strip())


def _heading(name: str) -> str:
    kind = {"tokens": "tokens", "ext": "external"}.get(name, "motion")
    return f"{name} ({kind})"


# --------------------------------------------------------------------------- tests
def test_best_method_of_each_column_is_marked_random_never(inside):
    page = Page(build_index(load_params("params.yaml"), inside))
    for name, evaluated in METRICS.items():
        rows = page.table(_heading(name), "method")
        scored = {"deletion AUC (lower better)": (evaluated["faithfulness"]["deletion_auc"], min),
                  "insertion AUC (higher better)": (evaluated["faithfulness"]["insertion_auc"], max)}
        if "evidence" in evaluated:
            scored["evidence AUROC"] = (evaluated["evidence"]["auroc"], max)
        assert {r["method"]["text"] for r in rows} == set(evaluated["faithfulness"]["deletion_auc"])
        for column, (values, pick) in scored.items():
            methods = {m: v for m, v in values.items() if m != "random"}
            best = pick(methods.values())
            expected = {m for m, v in methods.items() if v == best}          # every tie
            marked = {r["method"]["text"] for r in rows if r[column]["class"] == "best"}
            assert marked == expected, (name, column)
            assert all("★" in r[column]["text"] for r in rows if r[column]["class"] == "best")
            for r in rows:                                                   # the values as in metrics.json
                assert _number(r[column]) == pytest.approx(values[r["method"]["text"]], abs=5e-4)
    motion = page.table(_heading("motion"), "method")
    assert [r["method"]["text"] for r in motion] == sorted(METRICS["motion"]["faithfulness"]["deletion_auc"],
                                                           key=METRICS["motion"]["faithfulness"]["deletion_auc"].get)
    ci = METRICS["motion"]["faithfulness"]["deletion_auc_ci"]
    assert {r["method"]["text"]: r["deletion 95% CI"]["text"] for r in motion} == \
        {m: f"[{c['lo']:.3f}, {c['hi']:.3f}]" for m, c in ci.items()}
    passed = METRICS["motion"]["sanity"]["passed"]
    assert {r["method"]["text"]: r["sanity check"]["text"] for r in motion} == \
        {**{m: "passes" if ok else "FAILS" for m, ok in passed.items()}, "random": "–"}


def test_overview_has_each_experiments_headline_and_links_to_its_report(inside):
    out = inside / "reports"
    page = Page(build_index(load_params("params.yaml"), inside))
    rows = {r["experiment"]["text"]: r for r in page.table("Overview", "experiment")}
    assert list(rows) == ["motion", ODD, "tokens", "ext"]                # experiments, then externals
    for name, row in rows.items():
        target = (out / urllib.parse.unquote(row["experiment"]["href"])).resolve()
        assert target == (inside / "data" / name / "report" / "report.html").resolve() and target.is_file()
        assert row["MLflow run"]["text"] == _run_id(inside, name)
        deletion = {m: v for m, v in METRICS[name]["faithfulness"]["deletion_auc"].items() if m != "random"}
        best = [m for m, v in deletion.items() if v == min(deletion.values())]
        assert row["best method (deletion AUC)"]["text"].split(", ") == best
        assert _number(row["its deletion AUC"]) == pytest.approx(min(deletion.values()), abs=5e-4)
        accuracy = TRAIN[name]["test_accuracy"] if name in TRAIN else METRICS[name]["accuracy"]
        assert _number(row["test accuracy"]) == pytest.approx(accuracy, abs=5e-4)
    assert _number(rows["tokens"]["test perplexity"]) == pytest.approx(TRAIN["tokens"]["test_perplexity"], abs=5e-4)
    assert rows["tokens"]["test macro-F1"]["text"] == "–"
    assert _number(rows["motion"]["test macro-F1"]) == pytest.approx(TRAIN["motion"]["test_macro_f1"], abs=5e-4)
    passed = METRICS["tokens"]["sanity"]["passed"]
    assert rows["tokens"]["sanity check passed"]["text"] == f"{sum(passed.values())} of {len(passed)}"
    links = [c["href"] for t in page.tables for row in t["rows"] for c in row if c["href"]]
    assert all(not urllib.parse.urlsplit(h).scheme and not h.startswith("/") for h in links)   # relative


def test_user_text_is_escaped(inside):
    raw = build_index(load_params("params.yaml"), inside)
    page = Page(raw)
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "a", "table",
                              "thead", "tbody", "tr", "th", "td", "span", "details", "summary", "pre",
                              "figure", "img", "figcaption"}
    import re
    sources = re.findall(r'<img [^>]*src="([^"]*)"', raw)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")   # the ranking, inline
    text = "".join(page.text)
    assert f"corpus/{EVIL}.txt" in text                          # a param value, as text
    assert f"{ODD} (motion)" in [t["heading"] for t in page.tables]     # an instance name
    assert EVIL in {r["method"]["text"] for r in page.table(_heading(ODD), "method")}   # a method name
    assert "<script" not in raw.lower() and "&lt;script&gt;" in raw


def test_earlier_runs_are_listed_and_this_state_compared_with_the_one_before(inside):
    page = Page(build_index(load_params("params.yaml"), inside))
    runs = page.table(_heading("motion"), "")
    current = _run_id(inside, "motion")
    assert [r["run id"]["text"] for r in runs][0] == current and len(runs) == 2       # newest first
    assert [r[""]["text"] for r in runs] == ["this state", ""]
    assert _number(runs[1]["deletion AUC (grad_rollout)"]) == pytest.approx(
        EARLIER["evaluate.faithfulness.deletion_auc.grad_rollout"], abs=5e-4)
    text = " ".join("".join(page.text).split())
    accuracy = TRAIN["motion"]["test_accuracy"]
    deletion = METRICS["motion"]["faithfulness"]["deletion_auc"]["grad_rollout"]
    assert (f"test accuracy {accuracy:.3f} ({accuracy - EARLIER['final.test_accuracy']:+.3f}; higher is better)"
            in text)
    assert (f"deletion AUC of grad_rollout {deletion:.3f} "
            f"({deletion - EARLIER['evaluate.faithfulness.deletion_auc.grad_rollout']:+.3f}; lower is better)" in text)
    assert "No earlier runs: this state's run is the experiment's first." in text        # tokens, ext


def test_without_a_store_the_page_says_no_earlier_runs_and_creates_none(inside, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_ROOT", str(tmp_path))                        # a project root with no mlflow.db
        text = " ".join("".join(Page(build_index(load_params("params.yaml"), inside)).text).split())
    assert text.count("No earlier runs: the MLflow store has no finished run of this experiment.") == len(METRICS)
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_writes_the_page_and_logs_it_to_every_covered_run(inside, capsys):
    assert main([]) == 0
    page = (inside / "reports" / "index.html").read_text()
    assert sorted(p.name for p in (inside / "reports").iterdir()) == ["index.html"]
    client = tracking.MlflowClient(tracking.tracking_uri())
    for name in METRICS:
        run_id = _run_id(inside, name)
        assert [a.path for a in client.list_artifacts(run_id, "index")] == ["index/index.html"]
        logged = Path(client.download_artifacts(run_id, "index/index.html", str(inside / "dl" / name)))
        assert logged.read_text() == page
    assert not list(inside.glob(".reports.*"))                          # no temporary left


def _artifacts(root: Path) -> dict[str, list[str]]:
    client = tracking.MlflowClient(tracking.tracking_uri())
    return {name: [a.path for a in client.list_artifacts(_run_id(root, name), "index")] for name in METRICS}


@pytest.mark.parametrize("broken", ["metrics", "run"])
def test_bad_input_is_one_error_line_and_leaves_nothing(inside, tmp_path, capsys, broken):
    """A listed experiment without evaluate metrics, or whose run is not in the store: exit
    status 2, one line naming the experiment and the file, no reports/, nothing logged."""
    path = inside / "data" / "tokens" / ("evaluate/metrics.json" if broken == "metrics" else "track/run.json")
    original = path.read_text()
    before = _artifacts(inside)
    if broken == "metrics":
        path.unlink()
    else:
        path.write_text(json.dumps({"experiment": "tokens", "run_id": "0" * 32}))
    try:
        status = main(["--out", str(tmp_path / "reports")])
    finally:
        path.write_text(original)
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: tokens: "), err
    assert str(path.relative_to(inside)) in err and (broken == "metrics" or "0" * 32 in err)
    assert list(tmp_path.iterdir()) == []                               # no reports/, no temporary
    assert _artifacts(inside) == before


def test_recent_runs_are_the_last_n_then_the_current_run_and_the_one_before_it(inside):
    """tracking.recent_runs on runs of known start times: the last n newest first; a
    current run older than those follows with the run that started just before it."""
    starts = [START + 1000 * k for k in (5, 1, 3, 2, 4)]                # logged out of order
    ids = {}
    for k, start in enumerate(starts):
        path = inside / f"state{k}.json"
        path.write_text(json.dumps({"k": k}))
        ids[start], _ = tracking.log_pipeline_run("history", params={"k": k}, metrics={"m": float(k)},
                                                  files=[path], start_time=start, end_time=start + 10)
    newest = sorted(ids, reverse=True)
    got = lambda n, current=None: [r["start_time"] for r in tracking.recent_runs("history", n, current=current)]  # noqa: E731
    assert got(2) == newest[:2]
    assert got(2, ids[newest[3]]) == newest[:2] + [newest[3], newest[4]]     # current, then its predecessor
    assert got(2, ids[newest[4]]) == newest[:2] + [newest[4]]               # the first run: no predecessor
    assert got(2, ids[newest[1]]) == newest[:2]                             # already among them
    assert got(2, "0" * 32) == newest[:2]                                   # not in the store
    record = tracking.recent_runs("history", 1)[0]
    assert record["run_id"] == ids[newest[0]] and record["metrics"] == {"m": float(starts.index(newest[0]))}
    assert tracking.recent_runs("no such experiment") == []


def test_ranking_picture_shows_each_method_best_first_with_its_interval():
    """The index page's one picture: per experiment, deletion AUC (and evidence AUROC
    where there is ground truth) of each method with its interval, best first; what is
    drawn is read back from the figure and compared with the metrics it came from."""
    import matplotlib.pyplot as plt
    import numpy as np

    from attnlab.report.figures import method_ranking

    def ci(v):
        return {"lo": v - 0.05, "hi": v + 0.02}

    deletion = {"rollout": 0.30, "raw": 0.20, "alti": 0.25, "random": 0.50}
    auroc = {"rollout": 0.90, "raw": 0.70, "alti": 0.80, "random": 0.50}
    metrics = {"motion": {"faithfulness": {"deletion_auc": deletion,
                                           "deletion_auc_ci": {m: ci(v) for m, v in deletion.items()}}},
               "frames": {"faithfulness": {"deletion_auc": deletion,
                                           "deletion_auc_ci": {m: ci(v) for m, v in deletion.items()}},
                          "evidence": {"auroc": auroc}, "evidence_ci": {"auroc": {m: ci(v) for m, v in auroc.items()}}}}
    fig = method_ranking(metrics)
    axes = fig.axes
    assert len(axes) == 4 and not axes[1].axison            # motion has no ground truth: its right panel is off
    for ax, values, order in [(axes[0], deletion, ["raw", "alti", "rollout"]),
                              (axes[2], deletion, ["raw", "alti", "rollout"]),
                              (axes[3], auroc, ["rollout", "alti", "raw"])]:
        labels = [t.get_text() for t in ax.get_yticklabels()]
        ticks = list(ax.get_yticks())
        top_down = [label for _, label in sorted(zip(ticks, labels), reverse=True)]
        assert top_down == order                            # best first, random not a row
        line = ax.lines[0]                                  # the points
        x, y = line.get_xdata(), line.get_ydata()
        for label, tick in zip(labels, ticks):
            assert x[list(y).index(tick)] == pytest.approx(values[label])
        bars = [seg for coll in ax.collections for seg in coll.get_segments()]
        spans = sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in bars)
        assert spans == sorted((round(values[m] - 0.05, 6), round(values[m] + 0.02, 6)) for m in order)
        assert any(np.allclose(ln.get_xdata(), values["random"]) for ln in ax.lines[1:])   # the dashed baseline
    plt.close(fig)
