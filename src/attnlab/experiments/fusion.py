"""``fusion``: which of two streams does a two-stream network rely on, and do its
fusion weights say so?

Data: two views of each real digit (scikit-learn), an appearance stream (3 channels)
and a structure stream (``K`` keypoint heatmaps), one of which can be made
uninformative (``prepare.corrupt_*``), so the right answer is known. The streams are
packed along the channel axis (``x [N, 3 + K, S, S]``) so batching, training and
prediction are the shared ones; :meth:`FusionExperiment.forward` splits them again.

Items for the explanations and the deletion/insertion tests are the two streams.
Methods: ``weights`` (the fusion's own per-sample weights — the explanation this
experiment is about), input×gradient and integrated gradients summed per stream,
and a random baseline in evaluate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnlab import io
from attnlab.config import FusionParams
from attnlab.experiments.base import ClassifierExperiment
from attnlab.models import load_checkpoint

STREAMS = ("appearance", "structure")
CLASSES = [str(d) for d in range(10)]


def stream_weight_summary(weights: np.ndarray, y: np.ndarray, corrupted: np.ndarray,
                          classes: list[str]) -> dict[str, Any]:
    """Mean weight per stream: overall, per class, on samples where each stream is
    corrupted / clean, and on the informative stream (mean over samples with exactly
    one stream corrupted of the weight on the other one; None if there are none)."""
    out: dict[str, Any] = {"mean": {s: float(weights[:, i].mean()) for i, s in enumerate(STREAMS)},
                           "per_class": {c: {s: float(weights[y == k, i].mean()) for i, s in enumerate(STREAMS)}
                                         for k, c in enumerate(classes) if (y == k).any()}}
    for i, s in enumerate(STREAMS):
        for state, rows in (("corrupted", corrupted[:, i]), ("clean", ~corrupted[:, i])):
            if rows.any():
                out.setdefault(f"{s}_{state}", {t: float(weights[rows, j].mean()) for j, t in enumerate(STREAMS)})
    one = corrupted.sum(1) == 1
    informative = (~corrupted[one]).argmax(1)
    out["informative"] = float(weights[one][np.arange(one.sum()), informative].mean()) if one.any() else None
    return out


class FusionExperiment(ClassifierExperiment):
    name = "fusion"
    item_name = "stream"

    # ------------------------------------------------------------------ data and model
    def prepare(self, cfg: FusionParams, out: Path) -> None:
        from attnlab.data.fusion import make_two_stream

        p = cfg.prepare
        kw = dict(size=p.size, n_keypoints=p.n_keypoints, corrupt_stream=p.corrupt_stream,
                  corrupt_fraction=p.corrupt_fraction, corrupt_mode=p.corrupt_mode)
        train = make_two_stream("train", seed=p.seed, **kw)
        test = make_two_stream("test", seed=p.seed + 1, **kw)
        pack = lambda d: torch.cat([d["appearance"], d["structure"]], dim=1).numpy()  # noqa: E731
        io.save_arrays(out / "dataset.npz", x_train=pack(train), y_train=train["y"].numpy(),
                       x_test=pack(test), y_test=test["y"].numpy(),
                       corrupted_train=train["corrupted"].numpy(), corrupted_test=test["corrupted"].numpy())
        io.write_json(out / "meta.json", {
            "source": "sklearn digits: appearance (3 channels) + keypoint heatmaps", "classes": CLASSES,
            "streams": list(STREAMS), "channels": [train["appearance"].shape[1], train["structure"].shape[1]],
            "n_train": len(train["y"]), "n_test": len(test["y"]), "n_items": len(STREAMS),
            "corrupt_stream": p.corrupt_stream, "corrupt_fraction": p.corrupt_fraction,
            "corrupt_mode": p.corrupt_mode})

    def model_spec(self, cfg: FusionParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        a, s = meta["channels"]
        return "attnlab.models.fusion:TwoStreamClassifier", {
            "n_classes": len(meta["classes"]), "fusion": cfg.model.fusion, "appearance_channels": a,
            "structure_channels": s, "d": cfg.model.d, "nhead": cfg.model.nhead}

    def forward(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        a = model.channels[0]
        return model(xb[:, :a], xb[:, a:])

    def weights(self, model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The fusion's per-sample stream weights ``[N, 2]`` (eval mode)."""
        a = model.channels[0]
        model.eval()
        with torch.no_grad():
            return torch.cat([model.forward_with_weights(x[i:i + batch_size, :a], x[i:i + batch_size, a:])[1]
                              for i in range(0, len(x), batch_size)])

    def param_groups(self, cfg: FusionParams, model: nn.Module) -> list[dict]:
        return model.param_groups(cfg.train.lr, cfg.train.weight_decay, cfg.train.fusion_lr_scale)

    # ------------------------------------------------------------------ stages
    def extract(self, cfg: FusionParams, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        """predictions.npz, weights.npz (every mode) and, for the attention fusion, the
        recorded nn.MultiheadAttention maps in attention.h5."""
        from attnlab.training import predict

        if cfg.model.fusion == "attention":                      # attention.h5 and predictions.npz
            super().extract(cfg, prepared, trained, out, progress=progress)
        data, _ = self.load_dataset(prepared)
        model = load_checkpoint(trained / "model.pt")
        if cfg.model.fusion != "attention":
            prob = predict(model, data["x_test"], forward=self.forward).softmax(-1)
            io.save_arrays(out / "predictions.npz", y=data["y_test"].numpy(), pred=prob.argmax(-1).numpy(),
                           prob=prob.numpy().astype(np.float32))
        io.save_arrays(out / "weights.npz", weights=self.weights(model, data["x_test"], cfg.extract.batch_size).numpy(),
                       corrupted=data["corrupted_test"].numpy())

    def importance_batch(self, cfg: FusionParams, model: nn.Module, xb: torch.Tensor, n_items: int,
                         baseline: float | torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from attnlab.attribution import to_items
        from attnlab.evaluate import input_x_gradient, integrated_gradients

        e = cfg.explain
        a = model.channels[0]
        with torch.no_grad():
            logits, weights = model.forward_with_weights(xb[:, :a], xb[:, a:])
        target = logits.argmax(-1)
        fn = lambda inputs: self.forward(model, inputs)  # noqa: E731
        per_stream = lambda rel: torch.stack([rel[:, :a].sum(1), rel[:, a:].sum(1)], dim=1)  # noqa: E731
        imp: dict[str, torch.Tensor] = {}
        for m in e.methods:
            if m == "weights":
                rel = weights
            elif m == "input_x_gradient":
                rel = per_stream(input_x_gradient(fn, xb, target))                 # channels are the items
            else:
                rel = per_stream(integrated_gradients(fn, xb, target, n_steps=e.ig_steps, baseline=float(baseline)))
            imp[m] = to_items(rel.float(), n_items)
        return imp, target

    def explain(self, cfg: FusionParams, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        """Importance of each stream per method -> importance.npz."""
        data, _ = self.load_dataset(prepared)
        model = load_checkpoint(trained / "model.pt")
        model.eval()
        x, y, e = data["x_test"], data["y_test"], cfg.explain
        parts = [self.importance_batch(cfg, model, x[i:i + e.batch_size], len(STREAMS), e.baseline)
                 for i in range(0, len(x), e.batch_size)]
        importance = {m: torch.cat([p[0][m] for p in parts]).numpy() for m in e.methods}
        target = torch.cat([p[1] for p in parts]).numpy()
        io.save_arrays(out / "importance.npz", target=target, y=y.numpy(), **importance)

    def evaluate(self, cfg: FusionParams, root: Path, out: Path, *, progress: bool = False) -> None:
        """Accuracy, stream weights (overall, per class, corrupted vs clean, on the
        informative stream, and their figures) and deletion/insertion over the two
        streams per method."""
        from attnlab.evaluate import random_importance, stream_masker
        from attnlab.experiments.evaluation import perturbation_curves, write_curves
        from attnlab.report import figures
        from attnlab.report.html import save_figure

        ev = cfg.evaluate
        res = out / "results"
        (res / "figures").mkdir(parents=True)
        data, meta = self.load_dataset(root / "prepare")
        model = load_checkpoint(root / "train" / "model.pt")
        model.eval()
        x, y = data["x_test"], data["y_test"]
        loaded = io.load_arrays(root / "explain" / "importance.npz")
        importance = {m: torch.from_numpy(v) for m, v in loaded.items() if m not in ("target", "y")}
        importance["random"] = random_importance((len(y), len(STREAMS)), ev.seed).float()
        target = torch.from_numpy(loaded["target"])
        stored = io.load_arrays(root / "extract" / "weights.npz")
        weights, corrupted = stored["weights"], stored["corrupted"]

        summary = stream_weight_summary(weights, y.numpy(), corrupted, meta["classes"])
        informative = summary["informative"]
        metrics: dict[str, Any] = {
            "n_samples": len(y), "accuracy": float((target == y).float().mean()), "fusion": cfg.model.fusion,
            "weights": summary,
            "found_informative": None if informative is None else bool(informative >= ev.goal),
            "goal": ev.goal}
        metrics["faithfulness"], curves = perturbation_curves(
            lambda inputs: self.forward(model, inputs), x, importance,
            stream_masker(meta["channels"], cfg.explain.baseline), target=target, steps=None,
            batch_size=ev.batch_size)
        write_curves(curves, res)
        io.write_json(out / "metrics.json", metrics)
        save_figure(figures.stream_weights_by_class(weights, y.numpy(), meta["classes"], list(STREAMS)),
                    res / "figures" / "weights_by_class.png")
        save_figure(figures.stream_weights_by_corruption(weights, corrupted, list(STREAMS)),
                    res / "figures" / "weights_by_corruption.png")

    def report(self, cfg: FusionParams, root: Path, out: Path) -> None:
        from attnlab.report.fusion import write_fusion_report

        write_fusion_report(self, cfg, root, out)
