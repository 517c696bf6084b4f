"""Small helpers shared by the stages and the library: atomic outputs, JSON, datasets, the
compiled kernels."""
from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np


class DataError(ValueError):
    """A file the pipeline reads is missing, damaged or not what was expected (a
    truncated checkpoint or attention store...); the message names the file. A stage
    reports it as one line on stderr and exits with status 2, writing nothing."""


class ExternalError(DataError):
    """A user's model, weights or data cannot be used; the message says why (a pipeline
    stage prints it as one line and exits with status 2, writing nothing)."""


class ServerUnreachable(ConnectionError):
    """The MLflow tracking server that ``MLFLOW_TRACKING_URI`` names does not answer; the
    message names the URI and what to do. A stage reports it as one line on stderr and
    exits with status 2 before doing any work."""


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
    """``MLFLOW_TRACKING_URI``, else the project's SQLite store ``sqlite:///<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def missing_sqlite(uri: str) -> bool:
    """A SQLite store whose file does not exist (MLflow's client would create it)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


def require_tracking_server(uri: str | None = None, *, timeout: float = 3.0) -> None:
    """Raise :class:`ServerUnreachable` unless the http(s) tracking server at ``uri``
    (default: ``MLFLOW_TRACKING_URI``) answers one GET of ``<uri>/health`` within
    ``timeout`` seconds. Any other store (a SQLite file, no variable) is not probed.

    MLflow's own client retries a dead server with backoff for minutes, and the
    pipeline talks to it only in its last stage (track): the stages call this first,
    so a server that is down stops the pipeline in seconds, before training. A success,
    a redirect or 401/403 (an authenticating proxy in front) counts as up, and so does
    a TLS handshake that fails (MLflow applies its own TLS settings); any other status
    (a proxy's 502 when the server behind it is down, 404 from something that is not
    MLflow), a refused connection, a timeout or an unknown host counts as down.
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if urllib.parse.urlsplit(uri).scheme.lower() not in ("http", "https"):
        return
    health = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        why = f"GET {health} answered HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return
        why = _reason(err.reason, timeout)
    except (OSError, http.client.HTTPException) as err:    # a timeout while reading, not HTTP at all
        why = _reason(err, timeout)
    raise ServerUnreachable(
        f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable ({why}): start it "
        f"(`make server` in the project, or your team's server) or unset MLFLOW_TRACKING_URI to log "
        f"into the project's own store (mlflow.db)")


def _reason(err: BaseException | str, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"nothing within {timeout:g} s"
    why = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return why[:1].lower() + why[1:]


def _remove_orphans(path: Path) -> None:
    """Remove the temporary directories of ``path`` left by writers that were killed
    (SIGKILL, power loss: no ``except`` ran). They are named ``.<name>.<pid>.<random>``;
    one whose process is still running is another writer's and is kept."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not tmp.is_dir() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:                     # e.g. EPERM: the process exists (another user's)
            pass


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    A stage writes all its outputs inside; on any error nothing is left behind, so
    bad input never leaves partial outputs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)                    # mkdtemp makes it private (0700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def hash_file(digest: Any, path: str | Path) -> Any:
    """Feed the bytes of ``path`` to a ``hashlib`` object in 1 MiB blocks (files of any
    size, never loaded whole); returns ``digest``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_arrays(path: str | Path, *, compress: bool = True, **arrays: np.ndarray) -> None:
    """``.npz`` of the arrays; ``compress=False`` for noise-like data (zlib costs time, gains nothing)."""
    (np.savez_compressed if compress else np.savez)(path, **arrays)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def compiled_kernel(name: str, expected: int, unversioned: int | None = None) -> ModuleType | None:
    """The C extension ``name`` (``attnlab.explain._fused``, ``attnlab._vocab``: built by
    ``pip install -e .`` from the ``.c`` file of the same name), or None when the caller
    must take torch's path: not built (no C compiler at install), or built from an older
    source -- its ``VERSION`` (``unversioned`` when it has none) is not ``expected``, the
    caller's ``KERNEL_VERSION`` -- which warns: an editable install keeps the ``.so`` of its
    last build after a pull that changed the source."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    version = getattr(module, "VERSION", unversioned)
    if version != expected:
        source = name.rpartition(".")[2] + ".c"
        warnings.warn(f"{name} was built from an older {source} (version {version}, expected {expected}): "
                      f"using torch's slower path; rebuild it with `pip install -e .` (make setup does)",
                      RuntimeWarning, stacklevel=2)
        return None
    return module


def exit_now(status: int = 0) -> None:
    """End the process without Python's teardown (what a stage script does when its stage
    succeeded): what normal exit does that matters — joining the threads that are not
    daemons, the ``atexit`` handlers (MLflow's, a tracer's), flushing stdout and stderr —
    and then ``os._exit``. Finalising every module and object of torch and MLflow at exit
    costs 0.6-1 s per stage process, about 30 s of a pipeline of 40 stages, for nothing:
    every file a stage writes is closed by then."""
    import atexit
    import sys
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
