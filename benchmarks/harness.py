"""Shared timing and reporting for the benchmarks (``make bench``, ``make bench-quick``).

Every benchmark reports each measured ratio through :func:`emit`, which prints one line

    ratio: <name> <value> <op> <goal>

where ``<op> <goal>`` comes from ``benchmarks/goals.toml`` (``<=`` when lower is better,
``>=`` when higher is). ``benchmarks/run.py`` collects these lines from every script,
prints one table and exits non-zero when a value misses its goal (or, in quick mode,
its goal loosened by the quick factor).

Timings are medians of interleaved, paired repeats after warm-up (:func:`paired_ratio`):
cold/warm effects and load changes then hit the measured code and its reference alike.
"""
from __future__ import annotations

import os
import statistics
import time
import tomllib
from pathlib import Path
from typing import Callable

# benchmarks/run.py --goals FILE passes its goals file down (also for a test's fake benchmarks)
GOALS_FILE = Path(os.environ.get("ATTNLAB_BENCH_GOALS") or Path(__file__).with_name("goals.toml"))
QUICK = os.environ.get("ATTNLAB_BENCH_QUICK", "") not in ("", "0")


def load_goals(path: Path = GOALS_FILE) -> dict[str, dict]:
    """``{name: {"goal": float, "better": "lower"|"higher", "quick": bool, ...}}``."""
    with open(path, "rb") as fh:
        goals = tomllib.load(fh)
    for name, spec in goals.items():
        if not isinstance(spec, dict) or "goal" not in spec:
            raise ValueError(f"{path}: [{name}] needs a 'goal' number")
        if spec.setdefault("better", "lower") not in ("lower", "higher"):
            raise ValueError(f"{path}: [{name}] better={spec['better']!r}; expected 'lower' or 'higher'")
    return goals


def emit(name: str, value: float, detail: str = "") -> None:
    """Print the machine-readable line for ``name`` (which must be in goals.toml)."""
    goals = load_goals()
    if name not in goals:
        raise KeyError(f"benchmark {name!r} has no goal in {GOALS_FILE.name}; add [{name}] goal = ...")
    spec = goals[name]
    op = "<=" if spec["better"] == "lower" else ">="
    print(f"ratio: {name} {value:.4g} {op} {spec['goal']:g}" + (f"   # {detail}" if detail else ""), flush=True)


def skip(name: str, why: str) -> None:
    """Print that goal ``name`` (which must be in goals.toml) is not measured here and
    why (e.g. an optional dependency is not installed); run.py lists it as skipped, not
    missed, when the script then exits 0."""
    if name not in load_goals():
        raise KeyError(f"benchmark {name!r} has no goal in {GOALS_FILE.name}; add [{name}] goal = ...")
    print(f"skipped: {name} {' '.join(why.split())}", flush=True)


def paired_ratio(ours: Callable[[], object], reference: Callable[[], object], *, reps: int = 11,
                 warmup: int = 2, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float]:
    """Median over ``reps`` of t(ours)/t(reference), each pair run back to back with the
    order alternating, after ``warmup`` untimed calls of each.

    ``clock``: wall time by default; :data:`cpu_clock` (CPU seconds of this process) for
    work that runs on one thread (:func:`single_thread`), so that time the process spends
    waiting for a core on a shared machine does not count.

    Returns ``(ratio, median seconds of ours, median seconds of reference)``.
    """
    for _ in range(warmup):
        ours(), reference()
    pairs = []
    for rep in range(reps):
        times = {}
        for which in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
            fn = ours if which == "ours" else reference
            t0 = clock()
            fn()
            times[which] = clock() - t0
        pairs.append((times["ours"], times["ref"]))
    ratio = statistics.median(o / max(r, 1e-12) for o, r in pairs)
    return ratio, statistics.median(o for o, _ in pairs), statistics.median(r for _, r in pairs)


#: CPU seconds of this process (all its threads): with one intra-op thread, the work
#: done, unaffected by other processes taking turns on the cores.
cpu_clock: Callable[[], float] = time.process_time


def single_thread() -> None:
    """Run torch on one intra-op thread (call before timing with :data:`cpu_clock`)."""
    import torch

    torch.set_num_threads(1)


def reps(full: int, quick: int) -> int:
    """``quick`` repetitions under ``make bench-quick`` (:data:`QUICK`), else ``full``."""
    return quick if QUICK else full
