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

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from attnlab.experiments.base import ClassifierExperiment, Explained, Perturbation, Prepared
from attnlab.schema import (Evaluate, Extract, HeadsDivideWidth, InputOptions, MethodsSection, NoSection, Section,
                            Train)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnlab.items import Items

STREAMS = ("appearance", "structure")
CLASSES = [str(d) for d in range(10)]


# --------------------------------------------------------------------------- params
Stream = Literal["appearance", "structure"]


class FusionPrepare(Section):
    size: int = Field(16, gt=7)                # side of both streams' images
    n_keypoints: int = Field(17, gt=0)         # structure stream: keypoint heatmap channels
    corrupt_stream: Stream | None = None       # the stream made uninformative (null: none)
    corrupt_fraction: float = Field(1.0, ge=0.0, le=1.0)
    corrupt_mode: Literal["noise", "shuffle"] = "noise"
    seed: int = 0


class FusionModel(HeadsDivideWidth):
    fusion: Literal["sum", "scalar", "convex", "channel", "attention"] = "attention"
    d_model: int = Field(32, gt=0)             # common token size of the two streams
    nhead: int = Field(1, gt=0)                # attention fusion heads


class FusionTrain(Train):
    fusion_lr_scale: float = Field(10.0, gt=0.0)   # the fusion's own parameters learn this much faster


class FusionExplain(MethodsSection, InputOptions):
    ITEMS: ClassVar[str] = "streams"
    baseline: float = 0.0                      # a removed stream's value (IG baseline, deletion/insertion)
    batch_size: int = Field(128, gt=0)


class FusionEvaluate(Evaluate):
    batch_size: int = Field(256, gt=0)
    goal: float = Field(0.8, gt=0.0, le=1.0)   # weight on the informative stream that counts as found


class FusionParams(Section):
    prepare: FusionPrepare = FusionPrepare()
    model: FusionModel = FusionModel()
    train: FusionTrain = FusionTrain()
    extract: Extract = Extract()
    aggregate: NoSection = NoSection()
    explain: FusionExplain = FusionExplain()
    evaluate: FusionEvaluate = FusionEvaluate()
    report: NoSection = NoSection()            # the report shows every test sample's weights: no knobs


# --------------------------------------------------------------------------- the kind
def stream_weights(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fusion's own weights ``[B, 2]`` of the packed streams ``x``."""
    return model.forward_with_weights(*model.unpack(x))[1]


class FusionExperiment(ClassifierExperiment):
    name = "fusion"
    params = FusionParams
    order = 50
    item_name = "stream"
    report_kind = "fusion"

    def write_report(self, cfg: Any, lay: Any) -> Any:
        from attnlab.report.fusion import write_fusion_report

        return write_fusion_report(self, cfg, lay)

    def prepare(self, cfg: FusionParams) -> Prepared:
        import torch

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
        from attnlab.items import StreamItems

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
