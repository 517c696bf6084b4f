"""The evaluate stage's cost, as a ratio of the train stage's on the same experiment.

Runs the motion experiment's stages (with the project's params.yaml) in a temporary
directory and prints evaluate time / train time, each measured in this run.
Goal: the evaluation stays proportional to training (well under 1x here).
"""
import tempfile
import time
from pathlib import Path

import torch

from attnlab.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["motion", "--params", str(ROOT / "params.yaml"), "--data", tmp]
        for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate"):
            t0 = time.perf_counter()
            run(stage, argv, progress=False)
            times[stage] = time.perf_counter() - t0
    t_train, t_explain, t_eval = times["train"], times["explain"], times["evaluate"]
    print(f"motion train: {t_train:.1f} s, explain: {t_explain:.1f} s, evaluate: {t_eval:.1f} s")
    print(f"evaluate / train: {t_eval / t_train:.2f}x (goal: proportional, < 1x); "
          f"(explain + evaluate) / train: {(t_explain + t_eval) / t_train:.2f}x (for reference)")


if __name__ == "__main__":
    main()
