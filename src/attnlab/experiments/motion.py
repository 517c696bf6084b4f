"""``motion``: BasicMotions sensor sequences -> per-timestep embedding -> TransformerEncoder."""
from __future__ import annotations

from typing import Any, Literal

from attnlab.experiments.base import ClassifierExperiment, Prepared
from attnlab.schema import ClassifierParams, EncoderModel, Section


class MotionPrepare(Section):
    source: Literal["basic_motions"] = "basic_motions"
    normalize: bool = True


class MotionParams(ClassifierParams):
    prepare: MotionPrepare = MotionPrepare()
    model: EncoderModel = EncoderModel()


class MotionExperiment(ClassifierExperiment):
    name = "motion"
    params = MotionParams
    order = 10
    item_name = "timestep"

    def prepare(self, cfg: MotionParams) -> Prepared:
        from attnlab.data.motion import CHANNELS, load_basic_motions

        train, test, classes = load_basic_motions(normalize=cfg.prepare.normalize)
        return Prepared(
            {"x_train": train.x, "y_train": train.y, "x_test": test.x, "y_test": test.y},
            {"source": cfg.prepare.source, "classes": classes, "channels": list(CHANNELS),
             "n_train": len(train.y), "n_test": len(test.y), "n_items": train.x.shape[1],
             "n_features": train.x.shape[2]})

    def model_spec(self, cfg: MotionParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "attnlab.models.encoder:EncoderClassifier", {
            "in_features": meta["n_features"], "n_classes": len(meta["classes"]),
            **cfg.model.model_dump()}
