"""The benchmark guard (benchmarks/run.py, `make bench` / `make bench-quick`): it collects
every script's ``ratio:`` lines, prints one table and fails when a ratio misses its
threshold, a script crashes, or a goal gets no line. Run here on tiny fake benchmark
scripts with their own goals file, so the outcome is known in advance."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _write(tmp_path: Path, scripts: dict[str, str], goals: str) -> Path:
    for name, body in scripts.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    path = tmp_path / "goals.toml"
    path.write_text(textwrap.dedent(goals))
    return path


def _guard(tmp_path: Path, goals: Path, *args: str) -> tuple[int, str, dict[str, list[str]]]:
    """Run the runner; return (exit code, output, {table row name: its cells})."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNLAB_BENCH_QUICK", "ATTNLAB_BENCH_GOALS")}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--dir", str(tmp_path), "--goals", str(goals),
                           "--timeout", "60", *args], capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("benchmark "))
    spans = [m.span() for m in re.finditer(r"-+", lines[head + 1])]      # the table's column widths
    spans[-1] = (spans[-1][0], None)                                     # the status runs to the end
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans]
        rows[cells[0]] = cells[1:]
    return proc.returncode, out, rows


GOALS = """
    [speed]
    goal = 1.2
    better = "lower"
    quick = true

    [faster_than_naive]
    goal = 20
    better = "higher"
    quick = false
"""


def _script(**values: float) -> str:
    """A fake benchmark printing ``ratio: <name> <value>`` lines (naming each as a string
    literal, which is how the runner finds the script that measures a goal)."""
    return "".join(f'print("ratio:", "{name}", {value}, "  # detail")\n' for name, value in values.items())


def test_every_ratio_within_its_goal_passes_and_is_tabled(tmp_path):
    goals = _write(tmp_path, {"bench_a.py": _script(speed=1.05),
                              "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 0, out
    assert rows["speed"] == ["1.05", "<= 1.2", "<= 1.2", "ok"]
    assert rows["faster_than_naive"] == ["35", ">= 20", ">= 20", "ok"]
    assert "2 of 2 ok; 0 missed" in out


def test_a_ratio_above_its_threshold_fails(tmp_path):
    """The guard's point: a slow-down past the goal makes the run (and `make test`) fail."""
    goals = _write(tmp_path, {"bench_a.py": _script(speed=1.3),
                              "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1, out
    assert rows["speed"] == ["1.3", "<= 1.2", "<= 1.2", "MISSED"]
    assert rows["faster_than_naive"][-1] == "ok"


def test_a_higher_is_better_ratio_below_its_goal_fails(tmp_path):
    goals = _write(tmp_path, {"bench_a.py": _script(speed=1.0),
                              "bench_b.py": _script(faster_than_naive=12)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1 and rows["faster_than_naive"][-1] == "MISSED", out


@pytest.mark.parametrize("value, ok", [(1.79, True), (1.81, False)])
def test_quick_mode_thresholds_are_the_goal_loosened_1_5x(tmp_path, value, ok):
    """Quick: goal 1.2 -> threshold 1.8, only quick goals, only their scripts, each told
    ATTNLAB_BENCH_QUICK=1 (bench_b has no quick goal: not run, its goal not expected)."""
    scripts = {"bench_a.py": 'import os\nassert os.environ["ATTNLAB_BENCH_QUICK"] == "1"\n'
                             'print("ratio: speed %s <= 1.2")\n' % value,
               "bench_b.py": 'raise SystemExit("bench_b must not run in quick mode")\n'}
    goals = _write(tmp_path, scripts, GOALS.replace('better = "lower"', 'better = "lower"\n    script = "bench_a.py"'))
    code, out, rows = _guard(tmp_path, goals, "--quick")
    assert code == (0 if ok else 1), out
    assert rows["speed"][:3] == [f"{value:g}", "<= 1.2", "<= 1.8"]
    assert rows["speed"][3] == ("ok" if ok else "MISSED")
    assert "faster_than_naive" not in rows and "== bench_b.py" not in out      # not run


def test_quick_threshold_for_higher_is_better_is_goal_over_1_5(tmp_path):
    goals = _write(tmp_path, {"bench_b.py": _script(faster_than_naive=14)}, GOALS.replace("quick = false", "quick = true")
                   .replace("[speed]\n    goal = 1.2", "[speed]\n    script = \"bench_none.py\"\n    goal = 1.2"))
    code, out, rows = _guard(tmp_path, goals, "--quick")
    assert rows["faster_than_naive"] == ["14", ">= 20", ">= 13.3", "ok"], out
    assert rows["speed"][-1].startswith("MISSED") and code == 1        # no script measures it


def test_a_crashing_benchmark_fails_even_when_its_other_ratios_are_fine(tmp_path):
    goals = _write(tmp_path, {"bench_a.py": _script(speed=1.0) + "raise RuntimeError('boom')\n",
                              "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1, out
    assert rows["speed"][-1] == "MISSED (bench_a.py crashed (exit 1))"
    assert "RuntimeError: boom" in out                                 # its output is shown


def test_a_benchmark_that_crashes_before_its_line_fails(tmp_path):
    goals = _write(tmp_path, {"bench_a.py": "import sys\nsys.exit(3)\n" + _script(speed=1.0),
                              "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1
    assert rows["speed"] == ["-", "<= 1.2", "<= 1.2", "MISSED (bench_a.py crashed (exit 3), no line)"], out


def test_a_goal_without_a_line_fails(tmp_path):
    """A benchmark that stops measuring a goal (exits fine, prints nothing for it)."""
    goals = _write(tmp_path, {"bench_a.py": 'print("measuring speed... forgot to emit")\n',
                              "bench_b.py": _script(faster_than_naive=35)},
                   GOALS.replace('better = "lower"', 'better = "lower"\n    script = "bench_a.py"'))
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1
    assert rows["speed"] == ["-", "<= 1.2", "<= 1.2", "MISSED (no line from bench_a.py)"], out


def test_a_line_without_a_goal_fails(tmp_path):
    goals = _write(tmp_path, {"bench_a.py": _script(speed=1.0, brand_new=3.0),
                              "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1 and rows["brand_new"] == ["3", "-", "-", "MISSED (no goal in goals.toml)"], out


def test_harness_emit_reads_the_goals_file_the_runner_passes(tmp_path):
    """A fake script using the real harness: emit() formats the line from the goals file
    given to the runner, and an unknown name is an error (a crash, hence a failure)."""
    body = (f"import sys\nsys.path.insert(0, {str(BENCH)!r})\nfrom harness import emit\n"
            "emit('speed', 1.1, 'from the harness')\n")
    goals = _write(tmp_path, {"bench_a.py": body, "bench_b.py": _script(faster_than_naive=35)}, GOALS)
    code, out, rows = _guard(tmp_path, goals)
    assert code == 0, out
    assert "ratio: speed 1.1 <= 1.2   # from the harness" in out
    (tmp_path / "bench_a.py").write_text(body.replace("'speed'", "'nameless'"))
    code, out, rows = _guard(tmp_path, goals)
    assert code == 1 and "has no goal" in out


def test_paired_ratio_is_the_median_of_paired_interleaved_ratios():
    """With a fake clock: ours costs 3 ticks, the reference 1, except one outlier pair;
    the median of per-pair ratios ignores it, warm-up calls are untimed, and the order
    alternates."""
    spec = importlib.util.spec_from_file_location("harness_under_test", BENCH / "harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    now, calls = [0.0], []

    def ours():
        calls.append("o")
        now[0] += 3.0 if len(calls) != 7 else 300.0      # one outlier

    def ref():
        calls.append("r")
        now[0] += 1.0

    ratio, t_ours, t_ref = harness.paired_ratio(ours, ref, reps=5, warmup=2, clock=lambda: now[0])
    assert ratio == 3.0 and t_ours == 3.0 and t_ref == 1.0
    assert calls == ["o", "r", "o", "r"] + ["o", "r", "r", "o", "o", "r", "r", "o", "o", "r"]
