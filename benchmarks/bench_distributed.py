"""Speed-up of two torchrun processes over one (``ATTNLAB_NPROC=2`` vs ``1``) on this machine.

For each experiment, in a temporary project (the stage scripts and a params.yaml derived
from the project's), ``prepare`` runs once; then the ``train`` stage with one epoch and
the ``extract`` stage run as the user runs them (``python stages/<stage>.py <experiment>``,
with ``ATTNLAB_NPROC`` set: 2 makes the script re-launch itself under ``torchrun
--standalone --nproc_per_node 2``), each 3 times, nproc=1 and nproc=2 interleaved (so
background load drifts hit both alike), and the medians are compared:

* in-stage: ``data/<experiment>/.timings/<stage>.json`` (rank 0's start and end inside
  the stage, without Python/torch start-up nor torchrun's launch);
* wall: the whole command, what a user waits for.

With ATTNLAB_NPROC unset the stage uses torch's default intra-op threads (one per core);
with 2 processes each gets cores/2 threads: the same cores, shared differently. Both
extractions use the same model (the one trained by one process), so their attention
files must hold the same data: checked dataset by dataset. No assertion on time.

Run: ``.venv/bin/python benchmarks/bench_distributed.py [experiment ...]`` (default
``tokens video``; about 5 minutes on 2 cores). video's training set is cut to
``--video-train`` clips (default 1000, params.yaml has 8000) so that one epoch takes
seconds, not a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from harness import emit  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
STAGE_TIMEOUT = 900                            # s: a stage hanging (e.g. a stuck rendezvous) fails the benchmark


class StageFailed(RuntimeError):
    pass


def cpu_busy() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``; 0 where there is none)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")          # minus idle and iowait


def children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs: torchrun's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(proj: Path, stage: str, exp: str, data: Path, nproc: int) -> tuple[float, float, float]:
    """Run ``stages/<stage>.py exp`` with ATTNLAB_NPROC=nproc: ``(wall s, in-stage s, other
    load)``, the last the mean number of cores other processes kept busy meanwhile."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATTNLAB_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}   # defaults, as make run
    env |= {"ATTNLAB_NPROC": str(nproc), "MLFLOW_DISABLE_TELEMETRY": "true"}
    timing = data / exp / ".timings" / f"{stage}.json"
    timing.unlink(missing_ok=True)
    cmd = [sys.executable, f"stages/{stage}.py", exp, "--params", "params.yaml", "--data", str(data)]
    busy0, ours0, t0 = cpu_busy(), children_cpu(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise StageFailed(f"{stage} {exp} (ATTNLAB_NPROC={nproc}) did not finish in {STAGE_TIMEOUT} s",
                          _tail(err.stderr)) from None
    wall = time.perf_counter() - t0
    other = max(0.0, (cpu_busy() - busy0) - (children_cpu() - ours0)) / wall
    if proc.returncode != 0:
        raise StageFailed(f"{stage} {exp} (ATTNLAB_NPROC={nproc}) exited with status {proc.returncode}",
                          _tail(proc.stderr))
    if not timing.is_file():
        raise StageFailed(f"{stage} {exp} (ATTNLAB_NPROC={nproc}) succeeded but wrote no {timing}",
                          _tail(proc.stderr))
    record = json.loads(timing.read_text())
    return wall, (record["end_ms"] - record["start_ms"]) / 1000, other


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    """The end of a stage's stderr; under torchrun the workers' own lines (``[rankN]: ...``,
    the root cause) first, as torchrun's summary traceback follows them."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out = [line for line in (text or "").replace("\r", "\n").splitlines() if line.strip()]
    ranks = [line for line in out if line.startswith("[rank")]
    if ranks:
        return "\n".join([*ranks[-lines:], "...", *out[-8:]])
    return "\n".join(out[-lines:])


def attention_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two attention files hold the same datasets (names, shapes, dtypes, values)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False, f"entries differ: {sorted(fa.keys())} vs {sorted(fb.keys())}"
        if int(fa.attrs["num_samples"]) != int(fb.attrs["num_samples"]):
            return False, f"num_samples {fa.attrs['num_samples']} vs {fb.attrs['num_samples']}"
        worst = ""
        for key in sorted(fa.keys()):
            da, db = fa[key], fb[key]
            if da.shape != db.shape or da.dtype != db.dtype:
                return False, f"{key}: {da.shape} {da.dtype} vs {db.shape} {db.dtype}"
            x, y = da[()], db[()]
            if not np.array_equal(x, y):
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                worst = (f"{key}: {int((diff > 0).sum())} of {diff.size} values differ, "
                         f"max |diff| {diff.max():.3g}")
        return not worst, worst or f"{len(fa.keys())} datasets, {fa.attrs['num_samples']} samples"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench(proj: Path, exp: str, repeats: int) -> tuple[list[tuple], tuple[bool, str]]:
    """Rows ``(exp, stage, {nproc: [(wall, in-stage, other load), ...]})`` and the attention check."""
    base = proj / "base"
    env = {k: v for k, v in os.environ.items() if k != "ATTNLAB_NPROC"} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "stages/prepare.py", exp, "--params", "params.yaml", "--data", str(base)],
                          cwd=proj, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"prepare {exp} exited with status {proc.returncode}", _tail(proc.stderr))
    print(f"{exp}: prepared in {time.perf_counter() - t0:.1f} s", flush=True)

    def fresh(name: str) -> Path:
        data = proj / name
        (data / exp).mkdir(parents=True, exist_ok=True)
        shutil.copytree(base / exp / "prepare", data / exp / "prepare", dirs_exist_ok=True)
        return data

    # train: one data dir per nproc; each run replaces train/ (atomic_dir); interleaved
    train_dirs = {n: fresh(f"train_n{n}") for n in (1, 2)}
    train: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            train[n].append(run_stage(proj, "train", exp, train_dirs[n], n))
    # extract: both from the model trained by one process (same weights -> same attention)
    extract_dirs = {n: fresh(f"extract_n{n}") for n in (1, 2)}
    for n in (1, 2):
        shutil.copytree(train_dirs[1] / exp / "train", extract_dirs[n] / exp / "train", dirs_exist_ok=True)
    extract: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            extract[n].append(run_stage(proj, "extract", exp, extract_dirs[n], n))
    files = [extract_dirs[n] / exp / "extract" / "attention.h5" for n in (1, 2)]
    check = attention_equal(*files) if all(f.is_file() for f in files) else (False, "no attention file")
    for stage, runs in (("train", train), ("extract", extract)):
        print(f"{exp} {stage}: " + "; ".join(
            f"nproc={n} in-stage {', '.join(f'{s:.2f}' for _, s, _ in runs[n])} s, "
            f"wall {', '.join(f'{w:.2f}' for w, _, _ in runs[n])} s, "
            f"other load {', '.join(f'{o:.1f}' for _, _, o in runs[n])}" for n in (1, 2)), flush=True)
    return [(exp, "train (1 epoch)", train), (exp, "extract", extract)], check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=["tokens", "video"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--video-train", type=int, default=1000, help="video: training clips (params.yaml: 8000)")
    args = parser.parse_args()
    started = time.perf_counter()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = list(args.experiments)
    for exp in args.experiments:
        params[exp]["train"]["epochs"] = 1
    if "video" in args.experiments:
        params["video"]["prepare"]["n_train"] = args.video_train
    print(f"cores: {os.cpu_count()}; nproc=1: torch's default {torch.get_num_threads()} intra-op threads; "
          f"nproc=2: {max(1, (os.cpu_count() or 1) // 2)} thread(s) per process; "
          f"median of {args.repeats} runs, nproc=1 and 2 interleaved")
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} before starting: other work shares the cores, "
              f"timings may be noisy")
    sizes = {"tokens": lambda p: f"{p['prepare']['n']} sequences x {p['prepare']['max_len']}, "
                                 f"d_model {p['model']['d_model']}",
             "video": lambda p: f"{p['prepare']['n_train']} train / {p['prepare']['n_test']} test clips, "
                                f"d_model {p['model']['d_model']}"}
    rows, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_distributed.") as tmp:
        proj = Path(tmp)
        shutil.copytree(ROOT / "stages", proj / "stages")
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for exp in args.experiments:
            if exp in sizes:
                print(f"{exp}: {sizes[exp](params[exp])}", flush=True)
            try:
                got, checks[exp] = bench(proj, exp, args.repeats)
            except StageFailed as err:
                print(f"error: {err.args[0]}; its stderr ends with:\n{err.args[1]}", file=sys.stderr)
                raise SystemExit(1) from None
            rows += got

    print()
    head = (f"{'experiment':10s} {'stage':16s} {'nproc=1 in-stage (wall)':>24s} {'nproc=2 in-stage (wall)':>24s} "
            f"{'speed-up in-stage':>18s} {'speed-up wall':>14s} {'other load 1 / 2':>17s}")
    print(head)
    print("-" * len(head))
    startup, loads, speedups = {1: [], 2: []}, [], []
    for exp, stage, runs in rows:
        (w1, s1, o1), (w2, s2, o2) = [tuple(median([r[i] for r in runs[n]]) for i in range(3)) for n in (1, 2)]
        speedups.append((s1 / s2, f"{exp} {stage}"))
        for n, (w, s) in ((1, (w1, s1)), (2, (w2, s2))):
            startup[n].append(w - s)
        loads += [o1, o2]
        print(f"{exp:10s} {stage:16s} {f'{s1:7.2f} s ({w1:6.2f} s)':>24s} {f'{s2:7.2f} s ({w2:6.2f} s)':>24s} "
              f"{s1 / s2:17.2f}x {w1 / w2:13.2f}x {f'{o1:.1f} / {o2:.1f}':>17s}")
    print()
    print("other load: mean cores kept busy by processes outside this benchmark during the runs (median)")
    if max(loads) > 0.25:
        print(f"NOISY: other processes used up to {max(loads):.1f} of the {os.cpu_count()} cores during the runs; "
              f"the ratios above are this machine's under that load, not an idle one's (nproc=1's 2 intra-op "
              f"threads meet at every operator, so a core taken away stalls it more than 2 one-thread processes "
              f"that meet once per step)")
    for exp, (equal, detail) in checks.items():
        print(f"{exp}: attention equal: {equal} ({detail})")
    print(f"outside the stage (wall - in-stage, median over the rows): nproc=1 {median(startup[1]):.1f} s, "
          f"nproc=2 {median(startup[2]):.1f} s (Python + torch import, plus for nproc=2 the re-launch: "
          f"torchrun and two more interpreters importing torch, and the gloo rendezvous)")
    print("why: the 2 cores are shared either way - nproc=1 already runs 2 intra-op threads, nproc=2 runs "
          "2 processes of 1 thread each - so the best case is the gain of splitting the batch over processes "
          "instead of threads; DDP adds a gradient all-reduce (gloo) per step and sharded test metrics per "
          "epoch; extraction adds writing shards and rank 0 merging them (plus the per-sample outputs, "
          "computed by rank 0 alone); and torchrun's start-up is paid on every command.")
    print(f"total: {time.perf_counter() - started:.0f} s")
    worst, where = min(speedups)
    emit("distributed_in_stage_speedup", worst, f"worst row: {where} (2 processes over 1, in-stage medians)")
    unequal = [exp for exp, (equal, _) in checks.items() if not equal]
    if unequal:
        raise SystemExit(f"error: the attention extracted by 2 processes differs from 1 process's: {unequal}")


if __name__ == "__main__":
    main()
