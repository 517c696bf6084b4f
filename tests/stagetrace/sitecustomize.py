"""Stage tracer: what a DVC stage script reads and which project code it runs.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that
has one, so putting ``tests/stagetrace`` first on ``PYTHONPATH`` loads this file in
every Python process (DVC's own, the stages, helpers). It stays inert unless

* ``ATTNLAB_TRACE_DIR`` is set, and
* the process runs a stage script: ``sys.argv[0]`` ends with ``stages/<name>.py``
  (under Python 3.11 ``sys.argv`` is already final when site imports this module).

When active it records, relative to the project root (the working directory):

``read``
    Files opened for reading under the root: the ``open`` audit event of
    ``open()``/``io.open``/``os.open`` (read = mode without ``w a x +``; for
    ``os.open``, whose mode is None, flags without ``O_WRONLY|O_RDWR|O_CREAT``), plus
    HDF5 files that h5py opens in C: the profiler sees the call of h5py's Python-level
    ``make_fid(name, mode, ...)`` (``h5py/_hl/files.py``) and reads its locals; mode
    ``'r'`` is a read. Not recorded: ``.py``/``.pyc`` and ``__pycache__`` (imports are
    what ``ran`` is about), directories, file descriptors, and what the stage writes
    itself: ``<data>/<exp>/<stage>/`` and the ``<data>/<exp>/.<stage>.*`` temporary
    directories of ``attnlab.io.atomic_dir``. An attempted read of a path that does not
    exist goes to ``missing`` instead (informative; a DVC dep cannot be missing).
``ran``
    Project source files (``<root>/src/**``, ``<root>/stages/**``) with code that ran
    outside module import. The profiler (``sys.setprofile``, installed when the
    ``cpython.run_file`` audit event announces the main script, so start-up frames
    never reach it) looks at each 'call' of a Python frame; one whose module file is
    a project source counts unless a module is being imported, i.e. a ``<module>``
    frame other than the ``__main__`` script's own is active on the thread's stack
    (the frame itself included). That is exactly the state a depth counter of
    ``<module>`` 'call'/'return' events would hold, but it is looked up only when a
    not-yet-recorded project file is called, instead of reading ``f_code`` on every
    call (an audited attribute in 3.11: each read would run the audit hook). So a
    module that is only imported does not count, neither does a function it calls at
    import time (class bodies and decorators included), and the same function called
    later by the stage does. The stage script itself always counts. Everything is
    cached per module file; once a file is recorded its calls cost one dict look-up.
    The profiler is also paused while the import system loads a module (a wrapper
    around ``importlib._bootstrap._find_and_load``): nothing there counts, and under
    3.11 profiling slows all Python code, imports being most of a small stage.

At exit (``atexit``) it writes ``$ATTNLAB_TRACE_DIR/<stage>@<experiment>.<pid>.json``::

    {"stage", "experiment", "read": [...], "ran": [...],          # the contract
     "missing": [...], "argv": [...], "seconds": float,            # informative
     "warnings": [...]}                                            # e.g. profiler replaced

Limits: only the main thread is profiled (``threading.setprofile`` is not used; the
stages are single-threaded), although opens are seen in every thread; h5py files
opened by code running at import time are not seen (the profiler is paused there;
Python-level opens are); child processes trace themselves only if they are stage
scripts; a process ended by ``os._exit`` or a signal writes no trace; C extensions
that open files without Python's ``open`` (other than h5py's) are invisible, as are
directory listings; opens by ``os.open`` relative to a ``dir_fd`` are resolved
against the working directory (the event lacks ``dir_fd``; only directories are
opened that way by the standard library, and directories are not recorded).
"""
from __future__ import annotations

import os
import sys


def _install() -> None:  # noqa: C901 - one closure keeps the hot paths free of globals
    trace_dir = os.environ.get("ATTNLAB_TRACE_DIR")
    argv = list(getattr(sys, "argv", None) or [])
    if not trace_dir or not argv:
        return
    script = argv[0].replace(os.sep, "/")
    parent, _, base = script.rpartition("/")
    if not (base.endswith(".py") and (parent == "stages" or parent.endswith("/stages"))):
        return

    import atexit
    import json
    import time

    t0 = time.perf_counter()
    stage = base[:-3]
    experiment = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else ""   # "": a plain stage (index)
    data = "data"                                   # stages' --data option (attnlab.pipeline)
    for i, a in enumerate(argv):
        if a == "--data" and i + 1 < len(argv):
            data = argv[i + 1]
        elif a.startswith("--data="):
            data = a.split("=", 1)[1]

    root = os.path.normpath(os.getcwd())
    root_real = os.path.realpath(root)
    trace_dir = os.path.abspath(trace_dir)
    sep = os.sep

    def relative_plain(p: str, base: str = root) -> str | None:
        return p[len(base) + 1:].replace(sep, "/") if p.startswith(base + sep) else None

    def relative(path: str) -> str | None:
        """``path`` relative to the root ('/'-separated), or None when outside it.
        The logical (abspath) form wins so that symlinked outputs keep their names."""
        p = os.path.normpath(os.path.abspath(path))
        rel = relative_plain(p)
        if rel is None:
            p = os.path.realpath(p)
            rel = relative_plain(p, root_real) or relative_plain(p)
        return rel

    out_abs = os.path.abspath(os.path.join(data, experiment, stage))
    out_dir = relative(out_abs) or out_abs.replace(sep, "/")
    tmp_prefix = out_dir.rsplit("/", 1)[0] + "/." + stage + "."     # atomic_dir's mkdtemp prefix

    def written_by_stage(rel: str) -> bool:
        return rel == out_dir or rel.startswith(out_dir + "/") or rel.startswith(tmp_prefix)

    read: set[str] = set()
    missing: set[str] = set()
    ran: set[str] = set()
    warnings: list[str] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    seen_paths: dict[str, str | None] = {}           # abspath -> rel (or None: not recorded)

    def note_read(path: str, may_be_missing: bool = True) -> None:
        key = os.path.abspath(path)
        if key in seen_paths:
            return
        rel = relative(key)
        if rel is not None and written_by_stage(rel):
            rel = None
        if rel is not None:
            if os.path.isdir(key):
                rel = None
            elif os.path.exists(key):
                read.add(rel)
            else:
                if may_be_missing:
                    missing.add(rel)
                return                              # may exist at a later attempt
        seen_paths[key] = rel

    # ------------------------------------------------------------------ profiler
    # Python 3.11 raises an audit event ("object.__getattr__") on every read of
    # frame.f_code and another ("builtins.id") on every id(): either in the hot path
    # runs our audit hook for each of the ~10^6 calls a stage makes. So a call is
    # classified by its module's __file__ (f_globals, unaudited), cached per file, and
    # f_code is read only in the rare cases that need it (below).
    OTHER, SOURCE, H5PY = 0, 1, 2
    kinds: dict = {None: OTHER}                      # module __file__ -> kind
    kinds_get = kinds.get
    source_rel: dict[str, str] = {}                  # module __file__ -> root-relative path
    dir_real: dict[str, str] = {}                    # realpath cache per directory
    main = {"globals": None}

    def classify(filename) -> int:
        kind = OTHER
        try:
            if isinstance(filename, str) and not filename.startswith("<"):
                p = os.path.normpath(os.path.abspath(filename))
                rel = relative_plain(p)
                if rel is None:                      # e.g. a symlinked sys.path entry
                    d, b = os.path.split(p)
                    if d not in dir_real:
                        dir_real[d] = os.path.realpath(d)
                    rel = relative_plain(os.path.join(dir_real[d], b), root_real)
                if rel is not None and rel.startswith(("src/", "stages/")):
                    kind, source_rel[filename] = SOURCE, rel
                elif p.replace(sep, "/").endswith("h5py/_hl/files.py"):
                    kind = H5PY
        except Exception as err:                     # an exception would unset the profiler
            warnings.append(f"classify {filename!r}: {err!r}")
        kinds[filename] = kind
        return kind

    def importing(frame) -> bool:
        """Whether a <module> frame other than the __main__ script's is active on this
        thread's stack (the frame itself included): a module is being imported."""
        main_globals = main["globals"]
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals is not main_globals:
                return True
            frame = frame.f_back
        return False

    def profile(frame, event, arg):
        if event != "call":
            return
        try:                                         # free in 3.11 unless something raises
            filename = frame.f_globals.get("__file__")
            kind = kinds_get(filename)
            if kind == OTHER:                        # the hot path: one dict look-up
                return
            if kind is None:
                kind = classify(filename)
                if kind == OTHER:
                    return
            if kind == SOURCE:
                if not importing(frame):
                    ran.add(source_rel[filename])
                    kinds[filename] = OTHER          # recorded: nothing more to learn from it
            elif frame.f_code.co_name == "make_fid":  # kind == H5PY
                loc = frame.f_locals
                name, mode = loc.get("name"), loc.get("mode")
                if mode == "r" and isinstance(name, (str, bytes)):
                    name = os.fsdecode(name)
                    if os.path.isfile(name):         # not a file object's repr / in-memory name
                        note_read(name)
        except Exception as err:                     # an exception here would unset the profiler
            if len(warnings) < 20:
                warnings.append(f"profile: {err!r}")

    def pause_during_imports() -> None:
        """Switch the profiler off while the import system loads a module.

        Nothing that runs during an import counts, so this only saves time: under
        Python 3.11 any profile function makes all Python code run unspecialised, and
        most of a small stage's time is importing torch, pandas, matplotlib, mlflow.
        ``_find_and_load`` is what both the import statement (from C, looked up on the
        module each time) and ``importlib.import_module`` call for a module not yet in
        sys.modules. If it is missing, everything still works, just slower; a module
        run another way (runpy, a loader called directly) is excluded by importing()."""
        try:
            import importlib._bootstrap as bootstrap

            original = bootstrap._find_and_load
        except (ImportError, AttributeError) as err:
            warnings.append(f"profiling during imports too: {err!r}")
            return
        getprofile, setprofile = sys.getprofile, sys.setprofile

        def _find_and_load(*args, **kwargs):
            current = getprofile()
            if current is None:                      # nested import, or profiling stopped
                return original(*args, **kwargs)
            setprofile(None)
            try:
                return original(*args, **kwargs)
            finally:
                setprofile(current)

        bootstrap._find_and_load = _find_and_load

    # ------------------------------------------------------------------ audit hook
    state = {"profiling": False, "done": False}

    def audit(event, args):
        if event == "open":
            if state["done"]:
                return
            try:
                path, mode, flags = args
                if isinstance(path, int) or path is None:
                    return
                path = os.fsdecode(os.fspath(path))
                if path.endswith((".py", ".pyc")) or "__pycache__" in path:
                    return
                if mode is None:                        # os.open
                    if flags & write_flags:
                        return
                    # The event does not carry os.open's dir_fd: a relative name may be
                    # relative to a directory descriptor (shutil.rmtree, os.fwalk), not
                    # to the working directory, so it is not reported as missing.
                    note_read(path, may_be_missing=os.path.isabs(path))
                elif "w" in mode or "a" in mode or "x" in mode or "+" in mode:
                    return
                else:
                    note_read(path)
            except Exception as err:                    # an audit hook's exception would fail open()
                if len(warnings) < 20:
                    warnings.append(f"open: {err!r}")
        elif event == "cpython.run_file" and not state["profiling"]:
            state["profiling"] = True
            main["globals"] = getattr(sys.modules.get("__main__"), "__dict__", None)
            pause_during_imports()
            sys.setprofile(profile)

    def finish() -> None:
        if sys.getprofile() is not profile and state["profiling"]:
            warnings.append("the profiler was replaced or removed during the run: 'ran' may be incomplete")
        sys.setprofile(None)
        state["done"] = True
        if not state["profiling"]:
            warnings.append("no cpython.run_file event: the profiler never started")
        own = relative(argv[0])
        if own is not None:
            ran.add(own)
        result = {"stage": stage, "experiment": experiment, "read": sorted(read), "ran": sorted(ran),
                  "missing": sorted(missing - read), "argv": argv,
                  "seconds": round(time.perf_counter() - t0, 3), "warnings": warnings}
        os.makedirs(trace_dir, exist_ok=True)
        target = os.path.join(trace_dir, f"{stage}@{experiment}.{os.getpid()}.json")
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, target)

    sys.addaudithook(audit)
    atexit.register(finish)


def _chain() -> None:
    """Run the ``sitecustomize`` this file shadows, if the environment has one (checked
    with a few stats first: importing importlib.util would add ms to every process)."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    names = ("sitecustomize.py", "sitecustomize", "sitecustomize.pyc")
    if not any(os.path.exists(os.path.join(p or os.curdir, n)) for p in rest for n in names):
        return
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


try:
    _install()
except Exception as _err:   # the tracer must never stop a process from starting
    print(f"stagetrace: not tracing ({_err!r})", file=sys.stderr)
_chain()
