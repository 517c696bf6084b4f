"""Issue #18: the report and the MLflow UI in a real headless Chromium, driven by Selenium
with Debian's `chromium` and `chromium-driver` (`make test` installs them when missing, as
root; otherwise these tests skip and say why). The driver path is given explicitly, so
Selenium Manager never downloads anything. Requests and console errors are read from
Chrome's DevTools logs (`goog:loggingPrefs`). `scripts/screenshots.py` (`make screenshots`)
takes the documentation's pictures in the same browser."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
#: a token that is markup, a script and both quotes: the report must show it as text
EVIL = "<script>window.__pwned=1</script>\"'"


# --------------------------------------------------------------------------- helpers
def chrome(width: int = 1200, height: int = 900):
    """A headless Chromium (Debian's) through the system chromedriver, with the DevTools
    performance (network) and browser (console) logs on, in UTC and US English (the MLflow
    UI formats times in the browser's zone and locale)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--lang=en-US", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TZ": "UTC"})
    return webdriver.Chrome(options=options, service=service)


def tiny_tokens_report(tmp: Path) -> Path:
    """The real stages (prepare ... report) of a tiny `tokens` experiment on a token file
    whose every line holds EVIL; returns the experiment's data directory (about 10 s)."""
    from attnlab.pipeline import run

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    lines = [" ".join([*rng.choices(words, k=3), EVIL, *rng.choices(words, k=4)]) for _ in range(120)]
    (tmp / "tokens.txt").write_text("\n".join(lines) + "\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = ["tokens"]
    t = params["tokens"]
    t["prepare"].update(source="file", path=str(tmp / "tokens.txt"), max_len=12)
    t["model"].update(d_model=16, nhead=1, num_layers=1, dim_feedforward=32)
    t["train"].update(epochs=2, batch_size=32)
    t["aggregate"].update(min_count=1, top_k=8)
    t["evaluate"].update(steps=3, resamples=50, sanity={"samples": 4, "threshold": 0.5, "independent": False})
    t["report"].update(examples=1, heatmap_tokens=8)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["tokens", "--params", str(tmp / "params.yaml"), "--data", str(tmp / "data")]
    for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report"):
        run(stage, argv, progress=False)
    return tmp / "data" / "tokens"


@contextlib.contextmanager
def mlflow_server(tmp: Path):
    """`mlflow server` on a free loopback port with a SQLite store in ``tmp``; yields its
    URL; stopped by its process group's id (test_server.py's helpers)."""
    from test_server import ENV, _healthy, _stop, _wait
    from test_tracking import _free_port

    port = _free_port()
    log = tmp / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
             "--artifacts-destination", str(tmp / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _healthy(url), proc, "mlflow server", log)
        yield url
    finally:
        _stop(proc, group=True)


#: two states of one experiment that differ in train.epochs: (params, metrics, start ms, end ms)
RUNS = (({"train.epochs": 6, "model.nhead": 1}, {"test_accuracy": 0.5, "evaluate.faithfulness.deletion_auc.rollout": 0.25},
         1_700_000_000_000, 1_700_000_042_300),
        ({"train.epochs": 12, "model.nhead": 1}, {"test_accuracy": 0.75, "evaluate.faithfulness.deletion_auc.rollout": 0.125},
         1_700_000_100_000, 1_700_000_117_650))


def log_two_runs(url: str, root: Path) -> tuple[str, list[str]]:
    """RUNS logged by attnlab.tracking.log_pipeline_run to the server at ``url`` (as the
    track stage does, times given); returns (experiment id, run ids)."""
    from attnlab import tracking

    ids = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mp.setenv("ATTNLAB_ROOT", str(root))
        for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(name, raising=False)
        mp.chdir(root)
        for i, (params, metrics, start, end) in enumerate(RUNS):
            out = root / f"state{i}"
            out.mkdir(exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics))
            run_id, created = tracking.log_pipeline_run("demo", params=params, metrics=metrics,
                                                        files=[out / "metrics.json"], start_time=start, end_time=end)
            assert created
            ids.append(run_id)
        exp_id = tracking.MlflowClient(url).get_experiment_by_name("demo").experiment_id
    return exp_id, ids


def compare_url(url: str, exp_id: str, run_ids: list[str]) -> str:
    return f"{url}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([exp_id])}"


def seconds(duration: str) -> float:
    """MLflow's Utils.formatDuration back to seconds ('42.3s', '1.4min', '1.0h', '812ms')."""
    number, unit = re.fullmatch(r"([\d.]+)(ms|s|min|h|d)", duration).groups()
    return float(number) * {"ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400}[unit]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium (requirements-test.txt) is not installed")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Chromium is not installed (`make test` installs Debian's chromium and chromium-driver when "
                    "run as root; or: apt-get install chromium chromium-driver)")
    driver = chrome()
    yield driver
    driver.quit()


def _wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _network(driver) -> list[dict]:
    """The DevTools Network.* events since the last call."""
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return [e for e in events if e["method"].startswith("Network.")]


# --------------------------------------------------------------------------- the report
def test_report_is_self_contained_shows_the_metrics_and_no_markup_from_the_data(browser, tmp_path):
    root = tiny_tokens_report(tmp_path)
    page = (root / "report" / "report.html").as_uri()
    deletion = json.loads((root / "evaluate" / "metrics.json").read_text())["faithfulness"]["deletion_auc"]
    _network(browser), browser.get_log("browser")                     # drop what came before
    browser.get(page)
    _wait_for(browser, lambda d: d.execute_script("return document.readyState") == "complete")

    events = _network(browser)
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert page in urls and len(urls) > 1                              # the page and its figures
    assert [u[:80] for u in urls if u != page and not u.startswith("data:")] == []     # nothing outside the file
    assert [e["params"] for e in events if e["method"] == "Network.loadingFailed"] == []
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")

    # the faithfulness table: every method's deletion AUC as the report formats it ({:.3f})
    table = browser.find_element("xpath", "//table[.//th[text()='deletion AUC (lower better)']]")
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    col = header.index("deletion AUC (lower better)")
    shown = {tr.find_elements("tag name", "td")[0].text: tr.find_elements("tag name", "td")[col].text
             for tr in table.find_elements("css selector", "tbody tr")}
    assert shown == {m: f"{v:.3f}" for m, v in deletion.items()}

    # the token is text on the page, never markup: no script ran, no element was made of it
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert browser.execute_script("return document.scripts.length") == 0
    assert EVIL in browser.find_element("tag name", "body").text
    cells = browser.find_elements("xpath", "//td[contains(., 'window.__pwned')]")
    assert cells and all(c.text == EVIL for c in cells)


def _load_offline(browser, page: str) -> None:
    """Open ``page`` (a file URL) and check that it requested nothing outside the file,
    that no request failed and that the console stayed clean."""
    _network(browser), browser.get_log("browser")                     # drop what came before
    browser.get(page)
    _wait_for(browser, lambda d: d.execute_script("return document.readyState") == "complete")
    events = _network(browser)
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert page in urls
    assert [u[:80] for u in urls if u != page and not u.startswith("data:")] == []     # nothing outside the file
    assert [e["params"] for e in events if e["method"] == "Network.loadingFailed"] == []
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []


def _cells(table) -> dict[str, dict[str, object]]:
    """First column's text -> {column: cell element} of a table element."""
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    rows = [tr.find_elements("tag name", "td") for tr in table.find_elements("css selector", "tbody tr")]
    return {row[0].text: dict(zip(header, row)) for row in rows}


# --------------------------------------------------------------------------- the index page
def test_index_page_is_self_contained_shows_every_experiment_and_links_to_its_report(browser, tmp_path):
    from test_index import EVIL as INDEX_EVIL, METRICS, ODD, TRAIN, _heading, in_project, make_project

    from attnlab.report.index import main

    assert INDEX_EVIL == EVIL
    with in_project(tmp_path):
        make_project(tmp_path)
        assert main([]) == 0
    page = (tmp_path / "reports" / "index.html").as_uri()
    _load_offline(browser, page)
    # one picture, the methods' ranking, inline and drawn (offline: nothing else is requested)
    images = browser.execute_script("return Array.from(document.images).map(i => [i.src.slice(0, 22), i.naturalWidth])")
    assert len(images) == 1 and images[0][0] == "data:image/png;base64," and images[0][1] > 0

    # the headline of each experiment, as metrics.json has it
    overview = _cells(browser.find_element("xpath", "//table[.//th[text()='best method (deletion AUC)']]"))
    assert list(overview) == list(METRICS)
    for name, row in overview.items():
        accuracy = TRAIN[name]["test_accuracy"] if name in TRAIN else METRICS[name]["accuracy"]
        assert row["test accuracy"].text == f"{accuracy:.3f}"
        deletion = {m: v for m, v in METRICS[name]["faithfulness"]["deletion_auc"].items() if m != "random"}
        assert row["its deletion AUC"].text == f"{min(deletion.values()):.3f}"
    # each experiment's table: every method's deletion AUC, the best one starred
    headings = {h.text: h for h in browser.find_elements("tag name", "h2")}
    for name, evaluated in METRICS.items():
        table = headings[_heading(name)].find_element("xpath", "following-sibling::table[1]")
        shown = {m: c["deletion AUC (lower better)"].text for m, c in _cells(table).items()}
        deletion = evaluated["faithfulness"]["deletion_auc"]
        best = min(v for m, v in deletion.items() if m != "random")
        assert shown == {m: f"{v:.3f}" + (" ★" if v == best and m != "random" else "") for m, v in deletion.items()}

    # the links open the experiments' reports (an instance name with markup and quotes too)
    links = {a.text: a.get_attribute("href") for a in browser.find_elements("css selector", "table a")}
    assert set(links) == set(METRICS)
    for name, href in links.items():
        target = Path(urllib.parse.unquote(urllib.parse.urlsplit(href).path))
        assert target == tmp_path / "data" / name / "report" / "report.html" and target.is_file()
    browser.find_element("link text", ODD).click()
    _wait_for(browser, lambda d: d.title == ODD)
    assert browser.find_element("tag name", "body").text == f"the report of {ODD}"
    browser.back()
    _wait_for(browser, lambda d: d.current_url == page)

    # a param value, a method name and an instance name with markup are text, never markup
    summary = browser.find_element("xpath", "//summary[text()='params of tokens (validated, defaults filled in)']")
    summary.click()
    params = summary.find_element("xpath", "following-sibling::pre")
    assert f"corpus/{EVIL}" in params.text
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert browser.execute_script("return document.scripts.length") == 0
    odd = METRICS[ODD]["faithfulness"]["deletion_auc"]
    tied = ", ".join(m for m, v in odd.items() if v == min(v for m, v in odd.items() if m != "random"))
    assert EVIL in tied and sorted(c.text for c in browser.find_elements(
        "xpath", "//td[contains(., 'window.__pwned')]")) == sorted([EVIL, tied])   # ODD's table, the overview
    assert _heading(ODD) in headings


# --------------------------------------------------------------------------- a deep model's report
def test_report_of_a_deep_model_shows_every_page_of_its_layer_by_head_grid(browser, tmp_path):
    """A user's model with more layers than one grid page holds (figures.head_grid_pages:
    6 layers a page), through `attnlab explain`: every page of the grid is in the report,
    drawn, and the console stays clean."""
    import numpy as np
    import torch
    from user_models import CLIP_MODEL

    from attnlab.cli import main

    layers, per_page = 8, 6
    (tmp_path / "deep.py").write_text(CLIP_MODEL.replace("num_layers=2", f"num_layers={layers}"))
    sys.path.insert(0, str(tmp_path))
    try:
        import deep
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = deep.make_model()
    assert len(model.encoder.layers) == layers
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "clips.npy", rng.random((4, 5, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "explained"
    assert main(["explain", "--model", f"{tmp_path / 'deep.py'}:make_model", "--weights", str(tmp_path / "model.pt"),
                 "--inputs", str(tmp_path / "clips.npy"), "--out", str(out), "--methods", "raw", "rollout"]) == 0

    page = (out / "report.html").as_uri()
    _load_offline(browser, page)
    pages = -(-layers // per_page)
    # the report draws the grid of each example sample (the pipeline's report stage); the first sample's pages
    grids = browser.find_elements("xpath", "//figure[img[starts-with(@alt, 'heads_sample0_')]]")
    captions = [g.find_element("tag name", "figcaption").text for g in grids]
    assert len(grids) == pages and [f"page {p + 1} of {pages}" in c for p, c in enumerate(captions)] == [True] * pages
    for grid in grids:
        img = grid.find_element("tag name", "img")
        assert browser.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0 && "
                                      "i.naturalHeight > 0 && i.getBoundingClientRect().height > 0", img)
    # the pages hold the layers in order, at most per_page each: the last page is the shorter one
    heights = [browser.execute_script("return arguments[0].naturalHeight", g.find_element("tag name", "img"))
               for g in grids]
    assert heights[-1] < heights[0]


# --------------------------------------------------------------------------- the MLflow UI
_METRIC_ROW = """
const link = [...document.querySelectorAll("a[title='Plot chart']")].find(a => a.textContent.trim() === arguments[0]);
if (!link) return null;
const cell = link.parentElement, grids = [...document.querySelectorAll("[role=grid]")];
const values = grids[grids.indexOf(cell.closest("[role=grid]")) + 1];
return [...values.querySelectorAll("[role=rowgroup] > div")].filter(c => c.style.top === cell.style.top)
  .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left)).map(c => c.textContent.trim());
"""


def test_mlflow_ui_shows_the_runs_their_difference_and_their_durations(browser, tmp_path):
    from selenium.webdriver.common.by import By

    with mlflow_server(tmp_path) as url:
        exp_id, run_ids = log_two_runs(url, tmp_path)

        # README's link: the Runs table (a fresh browser would otherwise open MLflow 3.17's
        # GenAI overview: the experiment's kind tag alone does not choose the page)
        browser.get(f"{url}/#/experiments/{exp_id}?workflowType=machine_learning")
        _wait_for(browser, lambda d: "2 matching runs" in d.find_element(By.TAG_NAME, "body").text)
        assert re.search(rf"#/experiments/{exp_id}/runs\b", browser.current_url), browser.current_url
        cells = _wait_for(browser, lambda d: [c.text for c in d.find_elements(
            By.CSS_SELECTOR, "[col-id='duration'] .ag-cell-value") if c.text] or None)
        recorded = sorted((end - start) / 1000 for _, _, start, end in RUNS)
        assert len(cells) == 2 and all(abs(a - b) <= 1 for a, b in zip(sorted(map(seconds, cells)), recorded)), cells

        # the compare view: one column per run, in the URL's order
        browser.get(compare_url(url, exp_id, run_ids))

        def row(name):
            rows = browser.find_elements(By.XPATH, f"//tr[th[normalize-space()='{name}']]")
            return [c.text for c in rows[0].find_elements(By.XPATH, "./*[position() > 1]")] if rows else None

        def metric(name):      # a virtualised grid: the name's cell and the value cells at its height
            return browser.execute_script(_METRIC_ROW, name)

        _wait_for(browser, lambda d: row("Duration:") and row("train.epochs") and metric("test_accuracy"))
        assert row("Run ID:") == run_ids
        assert row("train.epochs") == [str(p["train.epochs"]) for p, _, _, _ in RUNS]       # the differing param
        assert row("model.nhead") == ["1", "1"]
        assert metric("evaluate.faithfulness.deletion_auc.rollout") == \
            [str(m["evaluate.faithfulness.deletion_auc.rollout"]) for _, m, _, _ in RUNS]
        assert metric("test_accuracy") == [str(m["test_accuracy"]) for _, m, _, _ in RUNS]
        for shown, started, (_, _, start, end) in zip(row("Duration:"), row("Start Time:"), RUNS):
            assert abs(seconds(shown) - (end - start) / 1000) <= 1, shown
            when = datetime.strptime(started, "%m/%d/%Y, %I:%M:%S %p").replace(tzinfo=timezone.utc)
            assert abs(when.timestamp() - start / 1000) <= 1, started


def test_duration_format_is_read_back():
    assert [seconds(s) for s in ("812ms", "42.3s", "1.5min", "1.0h")] == [0.812, 42.3, 90.0, 3600.0]

