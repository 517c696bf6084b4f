"""Run the benchmarks, check every ratio against its goal, print one table.

    .venv/bin/python benchmarks/run.py            # make bench: every benchmarks/bench_*.py
    .venv/bin/python benchmarks/run.py --quick    # make bench-quick: the quick goals only

Each script prints its ratios as ``ratio: <name> <value> ...`` lines (``harness.emit``);
``goals.toml`` holds each goal (``goal``, ``better = "lower"|"higher"``, ``quick``). The
table lists every goal of the run: its value, goal, threshold and ``ok`` or ``MISSED``.
The exit status is 1 when any goal is missed, when a script crashes or times out, or
when a goal got no line at all (a benchmark that stopped measuring it counts as a miss).
A goal its script cannot measure on this machine (an optional dependency missing) is
reported by a ``skipped: <name> <why>`` line (``harness.skip``) and listed as skipped,
not missed, when the script exits 0.

Quick mode (``--quick`` or ``ATTNLAB_BENCH_QUICK=1``, run at the end of ``make test``):
only the goals with ``quick = true``, thresholds loosened by ``QUICK_FACTOR`` (goal × 1.5
when lower is better, goal / 1.5 when higher is), and only the scripts that measure such
a goal (the goal's ``script = "bench_x.py"`` key, else the script whose source names the
goal), each run with ``ATTNLAB_BENCH_QUICK=1`` so that it does fewer repeats.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_FACTOR = 1.5
LINE = re.compile(r"^ratio:\s+(\S+)\s+(\S+)")
SKIP = re.compile(r"^skipped:\s+(\S+)\s*(.*)$")   # harness.skip: the goal cannot be measured here (say why)


@dataclass
class Script:
    path: Path
    status: str = "not run"          # ok / crashed (exit N) / timed out
    seconds: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # goal -> why it was not measured


def load_goals(path: Path) -> dict[str, dict]:
    with open(path, "rb") as fh:
        goals = tomllib.load(fh)
    for name, spec in goals.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("goal"), (int, float)):
            raise SystemExit(f"{path}: [{name}] needs a number 'goal'")
        if spec.setdefault("better", "lower") not in ("lower", "higher"):
            raise SystemExit(f"{path}: [{name}] better={spec['better']!r}; expected 'lower' or 'higher'")
        spec.setdefault("quick", False)
    return goals


def owner(name: str, spec: dict, scripts: list[Path]) -> Path | None:
    """The script that measures goal ``name``: its ``script`` key, else the one whose
    source holds the name as a string literal."""
    if spec.get("script"):
        hits = [s for s in scripts if s.name == spec["script"]]
        return hits[0] if hits else None
    quoted = (f'"{name}"', f"'{name}'")
    hits = [s for s in scripts if any(q in s.read_text(encoding="utf-8", errors="replace") for q in quoted)]
    return hits[0] if hits else None


def threshold(spec: dict, quick: bool) -> float:
    goal = float(spec["goal"])
    if not quick:
        return goal
    return goal * QUICK_FACTOR if spec["better"] == "lower" else goal / QUICK_FACTOR


def meets(value: float, spec: dict, limit: float) -> bool:
    if math.isnan(value):
        return False
    return value <= limit if spec["better"] == "lower" else value >= limit


def run_script(script: Script, quick: bool, timeout: float) -> None:
    env = dict(os.environ)
    env["ATTNLAB_BENCH_QUICK"] = "1" if quick else "0"
    print(f"== {script.path.name}{' (quick)' if quick else ''}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen([sys.executable, str(script.path)], cwd=HERE.parent, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        deadline = t0 + timeout
        for line in proc.stdout:                      # echo as it comes, keep the ratio lines
            print("   " + line, end="", flush=True)
            skip = SKIP.match(line)
            if skip:
                script.skipped[skip.group(1)] = skip.group(2).strip()
            match = LINE.match(line)
            if match:
                try:
                    script.values[match.group(1)] = float(match.group(2))
                except ValueError:
                    script.values[match.group(1)] = math.nan
            if time.perf_counter() > deadline:
                proc.kill()
                break
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    finally:
        script.seconds = time.perf_counter() - t0
    if code is None or time.perf_counter() > t0 + timeout:
        script.status = f"timed out after {timeout:.0f} s"
    else:
        script.status = "ok" if code == 0 else f"crashed (exit {code})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("ATTNLAB_BENCH_QUICK", "") not in ("", "0"),
                        help="quick goals only, thresholds loosened x1.5 (also: ATTNLAB_BENCH_QUICK=1)")
    parser.add_argument("--goals", type=Path, default=Path(os.environ.get("ATTNLAB_BENCH_GOALS", HERE / "goals.toml")),
                        help="goals file (default benchmarks/goals.toml; also: ATTNLAB_BENCH_GOALS)")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the bench_*.py scripts are")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per script before it counts as failed (default 3600, quick 300)")
    parser.add_argument("only", nargs="*", help="run only these scripts (e.g. bench_explain.py)")
    args = parser.parse_args(argv)
    timeout = args.timeout or (300.0 if args.quick else 3600.0)

    goals = load_goals(args.goals)
    paths = sorted(args.dir.glob("bench_*.py"))
    if args.only:
        paths = [p for p in paths if p.name in args.only or p.stem in args.only]
    wanted = {n: s for n, s in goals.items() if s["quick"] or not args.quick}
    owners = {n: owner(n, s, paths) for n, s in wanted.items()}
    if args.only:                                     # goals of scripts not run are not expected
        wanted = {n: s for n, s in wanted.items() if owners[n] is not None}
    to_run = paths if not args.quick else [p for p in paths if p in owners.values()]
    scripts = [Script(p) for p in to_run]
    # the goals file the scripts' harness.emit reads
    os.environ["ATTNLAB_BENCH_GOALS"] = str(args.goals.resolve())

    started = time.perf_counter()
    for script in scripts:
        run_script(script, args.quick, timeout)
    values: dict[str, tuple[float, Script]] = {}
    for script in scripts:
        for name, value in script.values.items():
            values[name] = (value, script)

    rows, failures = [], 0
    for name, spec in wanted.items():
        limit = threshold(spec, args.quick)
        op = "<=" if spec["better"] == "lower" else ">="
        if name in values:
            value, script = values[name]
            ok = meets(value, spec, limit) and script.status == "ok"
            status = ("MISSED" if not meets(value, spec, limit) else
                      f"MISSED ({script.path.name} {script.status})" if script.status != "ok" else "ok")
            shown = f"{value:.3g}"
        elif any(name in s.skipped and s.status == "ok" for s in scripts):   # a skip that said why
            why = next(s.skipped[name] for s in scripts if name in s.skipped)
            status, shown, ok = f"skipped ({why})", "-", True
        else:
            src = owners.get(name)
            run = next((s for s in scripts if s.path == src), None)
            why = ("no benchmark names it" if src is None else
                   f"{src.name} {run.status}, no line" if run is not None and run.status != "ok" else
                   f"no line from {src.name}")
            status, shown, ok = f"MISSED ({why})", "-", False
        failures += not ok
        rows.append((name, shown, f"{op} {spec['goal']:g}", f"{op} {limit:.3g}", status))
    for name, (value, script) in values.items():       # a line with no goal: the goals file is behind
        if name not in goals:
            failures += 1
            rows.append((name, f"{value:.3g}", "-", "-", f"MISSED (no goal in {args.goals.name})"))
    for script in scripts:                             # a crash is a failure even if its lines came out
        if script.status != "ok" and not any(script.path.name in r[4] for r in rows):
            failures += 1
            rows.append((script.path.name, "-", "-", "-", f"MISSED ({script.status})"))

    head = ("benchmark", "value", "goal", "threshold" + (" (quick)" if args.quick else ""), "status")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(fmt.format(*head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row))
    took = ", ".join(f"{s.path.name} {s.seconds:.0f} s" for s in scripts)
    print(f"\n{len(rows) - failures} of {len(rows)} ok; {failures} missed. "
          f"{time.perf_counter() - started:.0f} s ({took})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
