"""The evaluate stage's cost, as a ratio of the train stage's, for every experiment.

Runs each experiment's stages with the project's params.yaml in a temporary directory,
as ``dvc repro`` does (torch's default thread count), and prints evaluate time / train
time, each measured in this run; then evaluate again without the randomisation sanity
check (``evaluate.sanity.samples: 0``) to show its share.
Goal (issue #17): evaluate at most 1x train for every experiment.
"""
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from harness import emit  # benchmarks/ is the script's directory

from attnlab.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train", "extract", "aggregate", "explain", "evaluate")


def main(experiments: list[str]) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    print(f"torch threads: {torch.get_num_threads()}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        without = Path(tmp) / "params_nosanity.yaml"
        for name in experiments:
            params[name]["evaluate"]["sanity"] = {**params[name]["evaluate"].get("sanity", {}), "samples": 0}
        without.write_text(yaml.safe_dump(params))
        for name in experiments:
            times = {}
            for stage in STAGES:
                t0 = time.perf_counter()
                run(stage, [name, "--params", str(ROOT / "params.yaml"), "--data", tmp], progress=False)
                times[stage] = time.perf_counter() - t0
            t0 = time.perf_counter()
            run("evaluate", [name, "--params", str(without), "--data", tmp], progress=False)
            t_plain = time.perf_counter() - t0
            ratio = times["evaluate"] / times["train"]
            worst = max(worst, ratio)
            print(f"{name:7s} train {times['train']:6.1f} s  explain {times['explain']:5.1f} s  "
                  f"evaluate {times['evaluate']:6.1f} s (without sanity {t_plain:5.1f} s)  "
                  f"evaluate/train {ratio:.2f}x (without sanity {t_plain / times['train']:.2f}x)", flush=True)
    emit("evaluate_vs_train", worst, "worst experiment: evaluate stage time / train stage time")


if __name__ == "__main__":
    main(sys.argv[1:] or ["motion", "tokens", "frames", "video", "fusion"])
