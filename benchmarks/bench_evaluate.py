"""The evaluate stage's cost, as a ratio of the train stage's on the same experiment.

Runs the motion experiment's stages (with the project's params.yaml) in a temporary
directory and prints evaluate time / train time, each measured in this run.
Goal: the evaluation stays proportional to training (well under 1x here).
"""
import tempfile
import time
from pathlib import Path

import torch

from attnlab.config import load_params
from attnlab.experiments import get_experiment

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_params(ROOT / "params.yaml").experiment("motion")
    exp = get_experiment("motion")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "motion"
        dirs = {s: root / s for s in ("prepare", "train", "extract", "explain", "evaluate")}
        for d in dirs.values():
            d.mkdir(parents=True)
        exp.prepare(cfg, dirs["prepare"])
        t0 = time.perf_counter()
        exp.train(cfg, dirs["prepare"], dirs["train"])
        t_train = time.perf_counter() - t0
        exp.extract(cfg, dirs["prepare"], dirs["train"], dirs["extract"])
        t0 = time.perf_counter()
        exp.explain(cfg, dirs["prepare"], dirs["train"], dirs["explain"])
        t_explain = time.perf_counter() - t0
        t0 = time.perf_counter()
        exp.evaluate(cfg, root, dirs["evaluate"])
        t_eval = time.perf_counter() - t0
    print(f"motion train: {t_train:.1f} s, explain: {t_explain:.1f} s, evaluate: {t_eval:.1f} s")
    print(f"evaluate / train: {t_eval / t_train:.2f}x (goal: proportional, < 1x); "
          f"(explain + evaluate) / train: {(t_explain + t_eval) / t_train:.2f}x (for reference)")


if __name__ == "__main__":
    main()
