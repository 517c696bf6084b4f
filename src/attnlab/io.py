"""Small file helpers shared by the stages: atomic outputs, JSON, datasets."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class DataError(ValueError):
    """A file the pipeline reads is missing, damaged or not what was expected (a
    truncated checkpoint or attention store...); the message names the file. A stage
    reports it as one line on stderr and exits with status 2, writing nothing."""


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
