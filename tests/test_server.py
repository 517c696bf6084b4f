"""The team's MLflow server (`make server`): a real server on a real PostgreSQL that
serves a pipeline run's params, metrics, artifacts and model; and, when the server
named by MLFLOW_TRACKING_URI is down, stages and `make store` that stop in seconds
with one line, before any training."""
import glob
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from attnlab import tracking
from attnlab.io import ServerUnreachable, require_tracking_server
from attnlab.models import EncoderClassifier
from test_tracking import _free_port, _log

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "ATTNLAB_NUM_THREADS": "1"}


def _alive(proc: subprocess.Popen, group: bool) -> bool:
    if not group:
        return proc.poll() is None
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, group=False) -> None:
    """Stop a process this module started, by its id; with ``group``, every process of
    the group it leads (`make server`: make, mlflow, its uvicorn workers and job
    consumers), waiting up to 30 s before SIGKILL."""
    send = os.killpg if group else os.kill
    if not _alive(proc, group):
        return
    send(proc.pid, sig)
    deadline = time.monotonic() + 30
    while _alive(proc, group) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(proc, group):
        send(proc.pid, signal.SIGKILL)
    proc.wait()


def _healthy(url: str) -> bool:
    """Whether the MLflow server at ``url`` answers its health check."""
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- a real PostgreSQL
@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, with a database `mlflow`.
    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user, in a
    directory of its own outside pytest's tmp dir (which only root may enter)."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not initdbs:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql package when "
                    "run as root; or: apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (requirements-test.txt) is not installed")
    bin_dir = Path(initdbs[-1]).parent
    user = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    base = Path(tempfile.mkdtemp(prefix="attnlab-pg-"))
    proc = None
    try:
        if user:
            shutil.chown(base, "postgres", "postgres")
        init = subprocess.run([bin_dir / "initdb", "-D", base / "data", "-U", "postgres", "-A", "trust",
                               "-E", "UTF8", "--no-sync", "--no-instructions"],
                              cwd=base, capture_output=True, text=True, **user)
        assert init.returncode == 0, init.stdout + init.stderr
        port = _free_port()
        log = base / "postgres.log"
        with open(log, "wb") as out:          # -F: no fsync, a throwaway cluster
            proc = subprocess.Popen([bin_dir / "postgres", "-D", base / "data", "-h", "127.0.0.1",
                                     "-p", str(port), "-k", base, "-F"],
                                    cwd=base, stdout=out, stderr=subprocess.STDOUT, **user)

        def connect(dbname="postgres"):
            return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname,
                                   connect_timeout=2, autocommit=True)

        def ready():
            try:
                connect().close()
                return True
            except psycopg.OperationalError:
                return False

        _wait(ready, proc, "postgres", log, timeout=30)
        with connect() as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield {"uri": f"postgresql://postgres@127.0.0.1:{port}/mlflow", "connect": connect}
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)         # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def server(postgres, tmp_path):
    """`make server` on a free port, backed by the PostgreSQL above, serving artifacts
    from a directory in tmp_path. Started through the Makefile (its `setup` prerequisite
    taken as done: this very environment), stopped by its process group's id."""
    port = _free_port()
    venv = Path(sys.prefix)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "-s", "-C", ROOT, f"VENV={venv}", "-o", f"{venv}/.installed", "-o", f"{venv}/.attnlab", "server",
             f"SERVER_PORT={port}", "SERVER_WORKERS=1", f"MLFLOW_BACKEND_URI={postgres['uri']}",
             f"SERVER_STORE={tmp_path / 'server'}"],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _healthy(url), proc, "make server", log)
        yield {"url": url, "artifacts": tmp_path / "server" / "artifacts", **postgres}
    finally:
        _stop(proc, group=True)


def test_make_server_on_postgresql_serves_a_pipeline_run(server, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    monkeypatch.setenv("ATTNLAB_ROOT", str(project))
    monkeypatch.chdir(project)
    assert tracking.init_store() == server["url"]

    torch.manual_seed(0)
    model = EncoderClassifier(6, 4, d_model=8, nhead=2, num_layers=1, dim_feedforward=16).eval()
    run_id, created = _log(project, {"train.lr": 0.1, "model.pooling": "mean"}, value=0.75, model=model)
    assert created
    assert _log(project, {"train.lr": 0.1, "model.pooling": "mean"}, value=0.75) == (run_id, False)

    client = tracking.MlflowClient(server["url"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1", "model.pooling": "mean"}
    assert run.data.metrics["final.acc"] == 0.75
    hist = client.get_metric_history(run_id, "test_accuracy")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.2), (2, 0.4), (3, 0.75)]
    assert list(tracking.find_runs("demo")["run_id"]) == [run_id]

    # the run is in PostgreSQL itself, not in some local file
    with server["connect"]("mlflow") as conn:
        rows = conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)).fetchall()
    assert dict(rows) == {"train.lr": "0.1", "model.pooling": "mean"}
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    # artifacts went up to the server (--serve-artifacts) and come back down through it
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list(server["artifacts"].rglob("metrics.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == {"acc": 0.75}
    (project / "out" / "metrics.json").unlink()
    got = tracking.mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="out/metrics.json",
                                                       dst_path=str(tmp_path / "download"))
    assert json.loads(Path(got).read_text()) == {"acc": 0.75}
    import mlflow.pytorch
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model", dst_path=str(tmp_path / "model"))
    x = torch.randn(2, 5, 6)
    assert type(loaded) is EncoderClassifier
    torch.testing.assert_close(loaded.eval()(x), model(x))


# --------------------------------------------------------------------------- the server is down
def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"       # bound once, then closed: nothing listens


def test_train_stage_fails_in_seconds_before_training_when_the_server_is_down(tmp_path):
    """The real train stage of a tiny motion experiment that trains fine without the
    variable: with MLFLOW_TRACKING_URI on a closed port it exits 2 within 10 s, with one
    `error:` line naming the URI and `make server`, and writes nothing."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["motion"]["model"].update(d_model=8, nhead=2, num_layers=1, dim_feedforward=16)
    params["motion"]["train"].update(epochs=2, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = tmp_path / "data" / "motion" / "prepare"
    prepared.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    np.savez(prepared / "dataset.npz", x_train=torch.randn(16, 5, 3, generator=g).numpy(), y_train=np.arange(16) % 2,
             x_test=torch.randn(6, 5, 3, generator=g).numpy(), y_test=np.arange(6) % 2)
    (prepared / "meta.json").write_text(json.dumps({"n_features": 3, "classes": ["x", "y"], "n_items": 5}))
    cmd = [sys.executable, str(ROOT / "stages" / "train.py"), "motion", "--params", "params.yaml"]
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}

    uri = _closed_port_uri()
    start = time.monotonic()
    down = subprocess.run(cmd, cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert down.returncode == 2, down.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert down.stderr == (f"error: the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable "
                           "(connection refused): start it (`make server` in the project, or your team's server) "
                           "or unset MLFLOW_TRACKING_URI to log into the project's own store (mlflow.db)\n")
    assert sorted(p.name for p in (tmp_path / "data" / "motion").iterdir()) == ["prepare"]   # no train/, no temp dir

    up = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr                    # the same stage without the variable trains
    assert (tmp_path / "data" / "motion" / "train" / "model.pt").is_file()


def test_make_store_says_the_server_is_down(tmp_path):
    """`make store` (`python -m attnlab.tracking`): one `error:` line from the store,
    make's own line after it, in seconds; nothing created."""
    uri, venv = _closed_port_uri(), Path(sys.prefix)
    start = time.monotonic()
    out = subprocess.run(["make", "-s", "-C", ROOT, f"VENV={venv}", "-o", f"{venv}/.installed", "-o", f"{venv}/.attnlab", "store"],
                         env={**ENV, "MLFLOW_TRACKING_URI": uri, "ATTNLAB_ROOT": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and time.monotonic() - start < 10
    ours, make = out.stderr.splitlines()
    assert ours.startswith(f"error: the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable "
                           "(connection refused): start it (`make server`")
    # make[1] when `make test` runs this: the level is in the environment
    assert re.fullmatch(r"make(\[\d+\])?: \*\*\* \[.*store\] Error 2", make), make
    assert list(tmp_path.iterdir()) == []


def test_make_store_creates_the_project_store_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ATTNLAB_ROOT", str(tmp_path))
    tracking.main()
    assert (tmp_path / "mlflow.db").is_file()


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, up", [(200, True), (401, True), (403, True), (404, False), (502, False),
                                        (503, False)])
def test_probe_reads_the_answer_of_health(status, up):
    """Up: MLflow's 200, or an authenticating proxy's 401/403. Down: a proxy's 502/503
    while the server behind it is down, a 404 from something that is not MLflow."""
    handler = type("Handler", (_Status,), {"status": status})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        if up:
            require_tracking_server(uri)
        else:
            with pytest.raises(ServerUnreachable, match=rf"^the MLflow tracking server {uri} .*\(GET {uri}/health "
                                                        rf"answered HTTP {status} "):
                require_tracking_server(uri)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_probe_gives_up_after_its_timeout_and_ignores_other_stores(monkeypatch):
    with socket.socket() as silent:                  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ServerUnreachable, match=r"\(nothing within 0\.5 s\)"):
            require_tracking_server(uri, timeout=0.5)
        assert time.monotonic() - start < 3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/mlflow.db")
    require_tracking_server()                        # not a server: nothing to probe
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    require_tracking_server()
