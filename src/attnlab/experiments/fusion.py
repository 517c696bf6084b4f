"""``fusion``: which of two streams does a two-stream network rely on, and do its
fusion weights say so?

Data: two views of each real digit (scikit-learn), an appearance stream (3 channels)
and a structure stream (``K`` keypoint heatmaps), one of which can be made
uninformative (``prepare.corrupt_*``), so the right answer is known. The streams are
packed along the channel axis (``x [N, 3 + K, S, S]``) so batching, training and
prediction are the shared ones; the model's ``unpack`` splits them again.

Items for the explanations and the deletion/insertion tests are the two streams.
Methods: ``weights`` (the fusion's own per-sample weights — the explanation this
experiment is about), input×gradient and integrated gradients summed per stream,
and a random baseline in evaluate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.config import FusionParams
from attnlab.experiments.base import ClassifierExperiment, Explained, Perturbation, Prepared
from attnlab.items import Items, StreamItems

STREAMS = ("appearance", "structure")
CLASSES = [str(d) for d in range(10)]


def stream_weights(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fusion's own weights ``[B, 2]`` of the packed streams ``x``."""
    return model.forward_with_weights(*model.unpack(x))[1]


class FusionExperiment(ClassifierExperiment):
    name = "fusion"
    params = FusionParams
    item_name = "stream"
    report_kind = "fusion"

    def write_report(self, cfg: Any, lay: Any) -> Any:
        from attnlab.report.fusion import write_fusion_report

        return write_fusion_report(self, cfg, lay)

    def prepare(self, cfg: FusionParams) -> Prepared:
        from attnlab.data.fusion import make_two_stream

        p = cfg.prepare
        kw = dict(size=p.size, n_keypoints=p.n_keypoints, corrupt_stream=p.corrupt_stream,
                  corrupt_fraction=p.corrupt_fraction, corrupt_mode=p.corrupt_mode)
        train = make_two_stream("train", seed=p.seed, **kw)
        test = make_two_stream("test", seed=p.seed + 1, **kw)
        pack = lambda d: torch.cat([d["appearance"], d["structure"]], dim=1).numpy()  # noqa: E731
        return Prepared(
            {"x_train": pack(train), "y_train": train["y"].numpy(), "x_test": pack(test), "y_test": test["y"].numpy(),
             "corrupted_train": train["corrupted"].numpy(), "corrupted_test": test["corrupted"].numpy()},
            {"source": "sklearn digits: appearance (3 channels) + keypoint heatmaps", "classes": CLASSES,
             "streams": list(STREAMS), "channels": [train["appearance"].shape[1], train["structure"].shape[1]],
             "n_train": len(train["y"]), "n_test": len(test["y"]), "n_items": len(STREAMS),
             "corrupt_stream": p.corrupt_stream, "corrupt_fraction": p.corrupt_fraction,
             "corrupt_mode": p.corrupt_mode})

    def model_spec(self, cfg: FusionParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        a, s = meta["channels"]
        return "attnlab.models.fusion:TwoStreamClassifier", {
            "n_classes": len(meta["classes"]), "appearance_channels": a, "structure_channels": s,
            **cfg.model.model_dump()}

    def forward(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return model(*model.unpack(xb))

    def param_groups(self, cfg: FusionParams, model: nn.Module) -> list[dict]:
        return model.param_groups(cfg.train.lr, cfg.train.weight_decay, cfg.train.fusion_lr_scale)

    def extract_outputs(self, cfg, model, data):
        from attnlab.training import predict

        weights = predict(model, data["x_test"], batch_size=cfg.extract.batch_size, forward=stream_weights)
        return super().extract_outputs(cfg, model, data) | {
            "stream_weights": {"weights": weights.numpy(), "corrupted": data["corrupted_test"].numpy()}}

    def items(self, cfg: FusionParams, meta: dict[str, Any]) -> Items:
        return StreamItems(tuple(meta["channels"]), weights=stream_weights)

    def perturbation(self, cfg: FusionParams, model: nn.Module, data: dict[str, torch.Tensor],
                     meta: dict[str, Any], explained: Explained) -> Perturbation:
        from attnlab.evaluate import stream_masker

        return Perturbation(lambda inputs: self.forward(model, inputs), explained.x,
                            stream_masker(explained.items.channels, cfg.explain.baseline))

    def ground_truth(self, cfg, lay, model, data, meta, explained):
        """The stream weights against the corrupted streams: overall, per class, corrupted
        vs clean, and on the informative stream (``found_informative`` against ``goal``)."""
        import attnlab.io as io
        from attnlab.evaluate.summaries import stream_weight_summary

        stored = io.load_arrays(lay.stream_weights)
        summary = stream_weight_summary(stored["weights"], data["y_test"].numpy(), stored["corrupted"],
                                        meta["classes"], list(STREAMS))
        informative = summary["informative"]
        return {"fusion": cfg.model.fusion, "weights": summary, "goal": cfg.evaluate.goal,
                "found_informative": None if informative is None else bool(informative >= cfg.evaluate.goal)}
