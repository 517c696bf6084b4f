"""The documentation's pictures, taken from a real run of the pipeline (`make screenshots`).

A tiny project (this repository's dvc.yaml, stages and src, with params.yaml cut down to a
small ``tokens`` experiment) is made in a temporary git + DVC repository and run twice with
``dvc repro``: once as committed, once with ``tokens.train.epochs`` changed, so its MLflow
store holds two real runs of one experiment that differ in one param. Then, in headless
Chromium (Debian's chromium + chromedriver, driven by Selenium; nothing is downloaded):

- docs/report.png: the top of the experiment's report (``data/tokens/report/report.html``);
- docs/index_page.png: the index page over the experiments (``reports/index.html``);
- docs/mlflow_runs.png: MLflow's UI on its "Model training" view (the Runs table, URL
  ``#/experiments/<id>?workflowType=machine_learning``) with both runs;
- docs/mlflow_compare.png: MLflow's compare view of the two runs (run details and params);
- docs/mlflow_live.png: the "Model metrics" charts of a third run while its training is still
  running (the train stage of a longer training, slowed down per epoch with
  ``ATTNLAB_SLOW_EPOCH``, in a params file and data directory of its own; the run is
  deleted afterwards, so the store keeps its two runs).

``--rev REV`` runs the pipeline of a commit instead of the working tree. ``--keep DIR`` keeps the tiny project in DIR (to look at it, or re-take pictures with
``--project DIR``). The pictures are reduced to a 256-colour palette to stay small; every
picture's caption in docs/ says which run it shows (docs/results.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EXPERIMENT = "tokens"
#: the param the second run changes, and its two values (committed, then changed)
PARAM, VALUES = ("train", "epochs"), (2, 5)


# --------------------------------------------------------------------------- the tiny project
def tiny_params(path: Path) -> dict:
    """The params.yaml at ``path`` with only a small ``tokens`` experiment listed."""
    params = yaml.safe_load(path.read_text())
    params["experiments"] = [EXPERIMENT]
    params["externals"] = {}
    t = params[EXPERIMENT]
    t["prepare"].update(n=600, max_len=16)
    t["model"].update(d_model=32, num_layers=2, dim_feedforward=64)
    t["train"][PARAM[1]] = VALUES[0]
    t["aggregate"].update(min_count=2)
    t["evaluate"].update(steps=5, resamples=200, sanity={"samples": 8, "threshold": 0.5, "independent": False})
    t["report"].update(heatmap_tokens=16)
    return params


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ATTNLAB_ROOT", "ATTNLAB_NPROC")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=str(repo / "src"), GIT_AUTHOR_NAME="attnlab", GIT_AUTHOR_EMAIL="attnlab@localhost",
               GIT_COMMITTER_NAME="attnlab", GIT_COMMITTER_EMAIL="attnlab@localhost")
    return env


def _sh(cmd: list[str], repo: Path, env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")


PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "params.yaml", "stages", "src", ".dvc")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def copy_pipeline(repo: Path, rev: str | None) -> None:
    """The pipeline's files (dvc.yaml, stages/, src/, .dvc/ config and plot templates) from
    the working tree, or from commit ``rev`` (``git archive``) when given; ``repo/SOURCE``
    says which (read by :func:`write_provenance`)."""
    commit = _git("rev-parse", "--short", rev or "HEAD")
    dirty = not rev and bool(_git("status", "--porcelain", "--untracked-files=no", "--", *PROJECT_FILES))
    (repo / "SOURCE").write_text(f"commit `{commit}`" + (" with uncommitted changes" if dirty else "") + "\n")
    if rev:
        tar = subprocess.run(["git", "archive", "--format=tar", rev, *PROJECT_FILES], cwd=ROOT,
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(repo)], input=tar, check=True)
        return
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, repo / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp", "cache"))
        else:
            shutil.copy(ROOT / name, repo / name)


def make_project(repo: Path, rev: str | None = None) -> None:
    """Copy the pipeline into ``repo``, commit it, and run it twice (two MLflow runs)."""
    copy_pipeline(repo, rev)
    params = tiny_params(repo / "params.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(repo)
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "a tiny tokens project"], repo, env)
    _sh([sys.executable, "-m", "attnlab.tracking"], repo, env)             # create the store once
    _sh(["dvc", "repro"], repo, env)                                       # run 1: as committed
    params[EXPERIMENT][PARAM[0]][PARAM[1]] = VALUES[1]                     # run 2: one param changed
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["dvc", "repro"], repo, env)


# --------------------------------------------------------------------------- MLflow UI, browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(repo: Path):
    """`mlflow ui` on the project's store (as `make ui` runs it) on a free loopback port;
    yields its URL; stopped by its process group's id."""
    port = _free_port()
    log = repo / "mlflow-ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}"],
                                cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=_env(repo),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: mlflow ui did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chrome(width: int, height: int):
    """Debian's headless Chromium through its chromedriver (Selenium Manager never
    downloads anything), in UTC and US English."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        raise SystemExit(f"error: {CHROMIUM} and {CHROMEDRIVER} are needed: `make chromium` (as root) installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--lang=en-US", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER), env={**os.environ, "TZ": "UTC"}))


def save(driver, path: Path) -> None:
    from PIL import Image

    image = Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size // 1024} KB")


def wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _body(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def _close_panels(driver) -> None:
    """Close MLflow's side panels (the Assistant) so they do not cover the table."""
    for close in driver.find_elements("css selector", "[aria-label*='lose' i]"):
        if close.is_displayed():
            with contextlib.suppress(Exception):
                close.click()
            break


#: columns toggled in the Runs table: two attributes off (room), the param that differs and
#: metrics worth comparing on
COLUMNS = ("Source", "Models", "train.epochs", "final.test_perplexity", "evaluate.faithfulness.deletion_auc.rollout")


def toggle_column(driver, name: str) -> None:
    """Tick or untick ``name`` in the Runs table's "Columns" menu (searching for it first)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    button = next(b for b in driver.find_elements("css selector", "button") if b.text.strip() == "Columns")
    button.click()
    wait(driver, lambda d: d.find_elements("css selector", "input[placeholder='Search columns']"))
    search = driver.find_element("css selector", "input[placeholder='Search columns']")
    search.send_keys(name)
    time.sleep(0.5)
    label = driver.find_element("xpath", f"//input[@placeholder='Search columns']/ancestor::*"
                                         f"[.//span[normalize-space()='{name}']][1]//span[normalize-space()='{name}']")
    label.click()
    time.sleep(0.5)
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()           # the menu re-renders: no element to type into
    time.sleep(0.5)
    wait(driver, lambda d: not d.find_elements("css selector", "input[placeholder='Search columns']"), timeout=10)


def take(repo: Path, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    if len(runs) != 2:
        raise SystemExit(f"error: expected 2 runs of {EXPERIMENT!r} in {repo / 'mlflow.db'}, found {len(runs)}")
    run_ids = [r.info.run_id for r in runs]
    driver = chrome(1200, 860)
    try:
        driver.get((repo / "data" / EXPERIMENT / "report" / "report.html").as_uri())
        wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
        save(driver, out / "report.png")
        driver.set_window_size(1400, 860)
        driver.get((repo / "reports" / "index.html").as_uri())
        wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
        save(driver, out / "index_page.png")

        with mlflow_ui(repo) as url:
            driver.set_window_size(1640, 600)
            driver.get(f"{url}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
            wait(driver, lambda d: "2 matching runs" in _body(d))
            wait(driver, lambda d: [c for c in d.find_elements("css selector", "[col-id='duration'] .ag-cell-value")
                                    if c.text])
            for column in COLUMNS:
                toggle_column(driver, column)
            _close_panels(driver)
            time.sleep(2)
            save(driver, out / "mlflow_runs.png")

            driver.set_window_size(1200, 1000)
            driver.get(f"{url}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([exp.experiment_id])}"
                       "&workflowType=machine_learning")
            wait(driver, lambda d: d.find_elements("xpath", "//tr[th[normalize-space()='Duration:']]"))
            time.sleep(2)
            for switch in driver.find_elements("css selector", "button[role=switch]"):   # "Show diff only"
                if switch.get_attribute("aria-checked") == "false":
                    driver.execute_script("arguments[0].click()", switch)
            _close_panels(driver)
            driver.execute_script("document.evaluate(\"//*[normalize-space()='Run details']\", document, null, "
                                  "9, null).singleNodeValue?.scrollIntoView()")
            time.sleep(2)
            save(driver, out / "mlflow_compare.png")
    finally:
        driver.quit()
    write_provenance(repo, runs, out / "snippets" / "pictures.md")


#: the in-progress training of docs/mlflow_live.png: its epochs, seconds per epoch, and how
#: many epochs are logged when the picture is taken
LIVE_EPOCHS, LIVE_SLOW, LIVE_SHOT_AT = 60, 0.5, 20


def take_live(repo: Path, out: Path) -> None:
    """docs/mlflow_live.png: MLflow's "Model metrics" tab of a run whose training runs."""
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[EXPERIMENT]["train"].update(epochs=LIVE_EPOCHS, seed=1)
    (repo / "live.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = repo / "live-data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(repo / "data" / EXPERIMENT / "prepare", data / EXPERIMENT / "prepare")
    env = {**_env(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "ATTNLAB_ROOT": str(repo),
           "ATTNLAB_SLOW_EPOCH": str(LIVE_SLOW), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    print("$ python stages/train.py", EXPERIMENT, "--params live.yaml --data live-data  (in the background)")
    train = subprocess.Popen([sys.executable, "stages/train.py", EXPERIMENT, "--params", "live.yaml", "--data",
                              str(data)], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_id = None
    try:
        deadline = time.monotonic() + 300
        while run_id is None or len(client.get_metric_history(run_id, "train_loss")) < LIVE_SHOT_AT:
            if train.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the live training ended or stalled (status {train.returncode})")
            runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in before]
            run_id = runs[0].info.run_id if runs else None
            time.sleep(0.5)
        driver = chrome(1400, 900)
        try:
            with mlflow_ui(repo) as url:
                driver.get(f"{url}/#/experiments/{exp.experiment_id}/runs/{run_id}/model-metrics"
                           "?workflowType=machine_learning")
                wait(driver, lambda d: "test_accuracy" in _body(d)
                     and d.find_elements("css selector", ".js-plotly-plot, canvas"))
                _close_panels(driver)
                time.sleep(3)
                if client.get_run(run_id).info.status != "RUNNING":
                    raise SystemExit("error: the run is no longer RUNNING: the picture would not show a live run")
                save(driver, out / "mlflow_live.png")
        finally:
            driver.quit()
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGINT)          # its run ends FAILED ("train: KeyboardInterrupt")
            try:
                train.wait(60)
            except subprocess.TimeoutExpired:
                train.kill()
                train.wait()
        if run_id is not None:
            client.delete_run(run_id)                 # the store keeps the two runs of the other pictures


def write_provenance(repo: Path, runs: list, path: Path) -> None:
    """What the pictures show, for docs/results.md (included from ``path``): when they
    were taken, the pipeline's commit, the tiny params and the two runs' numbers."""
    t = yaml.safe_load((repo / "params.yaml").read_text())[EXPERIMENT]
    source = (repo / "SOURCE").read_text().strip()
    rows = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        seconds = (r.info.end_time - r.info.start_time) / 1000
        rows.append(f"| `{r.info.run_name}` | `{r.info.run_id[:12]}` | {p.get('.'.join(PARAM))} | {seconds:.0f} s | "
                    f"{m.get('final.test_perplexity', float('nan')):.2f} | "
                    f"{m.get('evaluate.faithfulness.deletion_auc.rollout', float('nan')):.3f} | "
                    f"{m.get('evaluate.faithfulness.deletion_auc.random', float('nan')):.3f} |")
    when = time.strftime("%Y-%m-%d", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"Taken on {when} by `make screenshots` (`scripts/screenshots.py`) from the pipeline of {source}: a "
        f"tiny `{EXPERIMENT}` experiment ({t['prepare']['n']} planted sequences of up to "
        f"{t['prepare']['max_len']} tokens; `d_model` {t['model']['d_model']}, {t['model']['num_layers']} layers "
        f"× {t['model']['nhead']} head) run twice by `dvc repro`, the second time with "
        f"`{EXPERIMENT}.{'.'.join(PARAM)}` changed. The two MLflow runs:\n\n"
        f"| run name | run id | `{'.'.join(PARAM)}` | duration | `final.test_perplexity` | "
        f"`deletion_auc.rollout` | `deletion_auc.random` |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "The run names carry the commit of the tiny project's own git repository. A run's duration runs from the "
        "start of its state's first stage to the end of its last; the second state reuses the first one's "
        "`prepare` (nothing it depends on changed), so its duration counts from there. The numbers of so small a "
        "model say nothing about the methods; they show what the views look like.\n")
    print(f"{path}: {', '.join(f'{r.info.run_name} ({r.info.run_id})' for r in runs)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    ap.add_argument("--keep", type=Path, help="make the tiny project here and keep it")
    ap.add_argument("--project", type=Path, help="an existing tiny project (from --keep): only take the pictures")
    ap.add_argument("--rev", help="run the pipeline of this commit (git archive) instead of the working tree")
    args = ap.parse_args(argv)
    if args.project:
        take(args.project.resolve(), args.out)
        take_live(args.project.resolve(), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="attnlab-screens-") as tmp:
        repo = args.keep.resolve() if args.keep else Path(tmp)
        repo.mkdir(parents=True, exist_ok=True)
        make_project(repo, args.rev)
        take(repo, args.out)
        take_live(repo, args.out)


if __name__ == "__main__":
    main()
