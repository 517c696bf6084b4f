"""``frames`` and ``video``: clips of real digits (scikit-learn) with planted evidence.

``frames``: ``[B, T, 1, H, W]`` clips whose class is decided by a few key frames
(evidence per frame) -> per-frame CNN -> ``nn.TransformerEncoder`` -> mean pooling.
``video``: a digit moving across the canvas (evidence per frame and patch) -> a
divided space-time transformer (TimeSformer-style; `model.arch: hf_timesformer` trains Hugging
Face's TimeSformer instead); its explanations are read out
with :func:`~attnlab.explain.spacetime_rollout` over frames x patches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from attnlab import methods as method_registry
from attnlab.experiments.base import ClassifierExperiment, Explained, Perturbation, Prepared
from attnlab.schema import (ClassifierParams, EncoderModel, HeadOptions, HeadsDivideWidth, InputOptions, MethodsSection,
                            SampleCap, Section)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnlab.items import Items

CLASSES = [str(d) for d in range(10)]


# --------------------------------------------------------------------------- params
class FramesPrepare(Section):
    n_train: int = Field(1500, gt=0)
    n_test: int = Field(300, gt=0)
    frames: int = Field(24, gt=1)
    size: int = Field(32, gt=7)
    n_key: int = Field(3, gt=0)                # key frames showing the clip's class
    distractor: Literal["digits", "noise", "none"] = "digits"
    noise: float = Field(0.2, ge=0.0)
    scale: int = Field(2, gt=0)                # digits are 8x8, upsampled to 8*scale pixels
    seed: int = 0


class VideoPrepare(Section):
    n_train: int = Field(1500, gt=0)
    n_test: int = Field(300, gt=0)
    frames: int = Field(8, gt=1)
    size: int = Field(32, gt=7)
    patch: int = Field(8, gt=0)
    noise: float = Field(0.2, ge=0.0)
    clutter: int = Field(0, ge=0)              # static scrambled digits in every frame
    max_speed: int = Field(2, gt=0)
    scale: int = Field(2, gt=0)                # digits are 8x8, upsampled to 8*scale pixels
    seed: int = 0


class SpaceTimeModel(HeadsDivideWidth):
    # divided: the project's DividedSpaceTimeTransformer; hf_timesformer: Hugging Face's
    # TimesformerForVideoClassification (divided space-time) of the same sizes, from scratch
    arch: Literal["divided", "hf_timesformer"] = "divided"
    d_model: int = Field(48, gt=0)
    nhead: int = Field(4, gt=0)
    num_layers: int = Field(2, gt=0)
    mlp_ratio: float = Field(2.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _transformers_installed(self) -> "SpaceTimeModel":
        import importlib.util

        if self.arch == "hf_timesformer" and importlib.util.find_spec("transformers") is None:
            raise ValueError("arch 'hf_timesformer' needs the transformers package, which is not installed "
                             "(pip install -r requirements-test.txt); or use arch 'divided'")
        return self


class SpaceTimeExplain(MethodsSection, HeadOptions, InputOptions, SampleCap):
    ITEMS: ClassVar[str] = "spacetime"
    examples: int = Field(4, gt=0)


class FramesParams(ClassifierParams):
    prepare: FramesPrepare = FramesPrepare()
    model: EncoderModel = EncoderModel()


class VideoParams(ClassifierParams):
    prepare: VideoPrepare = VideoPrepare()
    model: SpaceTimeModel = SpaceTimeModel()
    explain: SpaceTimeExplain = SpaceTimeExplain()

    @model_validator(mode="after")
    def _norms_recordable(self) -> "VideoParams":
        needs_norms = [m for m in self.explain.methods if "norms" in method_registry.get(m).needs]
        if self.model.arch == "hf_timesformer" and needs_norms:
            raise ValueError(f"explain.methods: {needs_norms[0]!r} needs norm-aware attention, which the recorder "
                             "does not take from Hugging Face's TimeSformer (only from nn.MultiheadAttention and "
                             "AttentionProbs markers); remove it or use model.arch 'divided'")
        for m in self.explain.methods:          # a method's refusal of one architecture: "video:<arch>"
            why = method_registry.get(m).unsupported.get(f"video:{self.model.arch}")
            if why is not None:
                raise ValueError(f"explain.methods: method {m!r} cannot explain model.arch "
                                 f"{self.model.arch!r}: {why}; remove it or use model.arch 'divided'")
        return self


# --------------------------------------------------------------------------- the kinds
def _prepared(train: dict, test: dict, meta: dict[str, Any]) -> Prepared:
    # pixels in [0, 1] plus Gaussian noise: float16 (loaded as float32) halves the file,
    # and zlib would spend seconds on incompressible noise
    return Prepared({"x_train": train["x"].half().numpy(), "y_train": train["y"].numpy(),
                     "x_test": test["x"].half().numpy(), "y_test": test["y"].numpy(),
                     "evidence_test": test["evidence"].numpy()},
                    {"classes": CLASSES, "n_train": len(train["y"]), "n_test": len(test["y"]), **meta},
                    compress=False)


class FramesExperiment(ClassifierExperiment):
    name = "frames"
    params = FramesParams
    order = 30
    item_name = "frame"

    def prepare(self, cfg: FramesParams) -> Prepared:
        from attnlab.data.clips import make_frame_clips

        p = cfg.prepare
        kw = dict(frames=p.frames, size=p.size, n_key=p.n_key, distractor=p.distractor, noise=p.noise,
                  scale=p.scale)
        train = make_frame_clips(p.n_train, split="train", seed=p.seed, **kw)
        test = make_frame_clips(p.n_test, split="test", seed=p.seed + 1, **kw)
        return _prepared(train, test, {"source": "sklearn digits, key frames among distractors",
                                       "n_items": p.frames})

    def model_spec(self, cfg: FramesParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "attnlab.models.frames:frames_classifier", {"n_classes": len(meta["classes"]),
                                                           **cfg.model.model_dump()}

    def perturbation(self, cfg: FramesParams, model: nn.Module, data: dict[str, torch.Tensor],
                     meta: dict[str, Any], explained: Explained) -> Perturbation:
        """The CNN embeds every frame on its own (in eval mode BatchNorm uses its running
        statistics), so a clip with frames removed has the embeddings of its kept frames
        and the baseline frame's embedding elsewhere. The tests therefore perturb cached
        embeddings ``[N, T, D]`` and run only the encoder: the same logits, with the CNN
        run once per test frame instead of once per perturbed clip."""
        import torch

        from attnlab.devices import model_device
        from attnlab.evaluate import sequence_masker

        model.eval()
        x, device = explained.x, model_device(model)
        base = torch.as_tensor(self.baseline(cfg, data), dtype=torch.float32, device=device)
        with torch.no_grad():                  # the embeddings are made (and stay) on the model's device
            h = torch.cat([model.embed(x[i:i + 256].to(device)) for i in range(0, len(x), 256)])
            fill = model.embed(base.expand(1, 1, *x.shape[2:]))[0, 0]                # [D]
        return Perturbation(model.forward_embedded, h, sequence_masker(fill))

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        return figures.frame_strip(data["x_test"][i, :, 0].numpy(), importance,
                                   data["evidence_test"][i].numpy(), title)


class VideoExperiment(ClassifierExperiment):
    """Items are the ``F·P`` patches of all frames, frame-major, patches row-major."""

    name = "video"
    params = VideoParams
    order = 40
    item_name = "patch"

    def prepare(self, cfg: VideoParams) -> Prepared:
        from attnlab.data.clips import make_video_clips

        p = cfg.prepare
        kw = dict(frames=p.frames, size=p.size, patch=p.patch, noise=p.noise, clutter=p.clutter,
                  max_speed=p.max_speed, scale=p.scale)
        train = make_video_clips(p.n_train, split="train", seed=p.seed, **kw)
        test = make_video_clips(p.n_test, split="test", seed=p.seed + 1, **kw)
        grid = p.size // p.patch
        return _prepared(train, test, {"source": "sklearn digits moving across a canvas",
                                       "frames": p.frames, "patches": grid * grid, "patch": p.patch,
                                       "size": p.size, "n_items": p.frames * grid * grid})

    FACTORIES = {"divided": "attnlab.models.spacetime:DividedSpaceTimeTransformer",
                 "hf_timesformer": "attnlab.models.hf_timesformer:HFTimesformerClassifier"}

    def model_spec(self, cfg: VideoParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``model.arch``: the project's divided space-time transformer or Hugging Face's
        TimeSformer, with the same sizes (both record time, then space attention)."""
        return self.FACTORIES[cfg.model.arch], {
            "n_classes": len(meta["classes"]), "frames": meta["frames"], "size": meta["size"],
            "patch": meta["patch"], **cfg.model.model_dump(exclude={"arch"})}

    def items(self, cfg: VideoParams, meta: dict[str, Any]) -> Items:
        """raw: the last block's class-token space attention (its per-frame copies, / F);
        received: the space attention each patch receives, mean over blocks, heads and
        queries; rollout / grad_rollout: space-time rollouts of the class token."""
        from functools import partial

        from attnlab.explain import split_spacetime
        from attnlab.items import SpaceTimeItems

        return SpaceTimeItems(meta["n_items"], patch=meta["patch"], split=partial(
            split_spacetime, blocks=cfg.model.num_layers, frames=meta["frames"], patches=meta["patches"]))

    def perturbation(self, cfg: VideoParams, model: nn.Module, data: dict[str, torch.Tensor],
                     meta: dict[str, Any], explained: Explained) -> Perturbation:
        from attnlab.evaluate import patch_masker

        masker = patch_masker(meta["frames"], meta["patch"], meta["size"], self.baseline(cfg, data))
        return Perturbation(lambda inputs: self.forward(model, inputs), explained.x, masker)

    def baseline(self, cfg: VideoParams, data: dict[str, torch.Tensor]) -> float | torch.Tensor:
        if cfg.explain.baseline == "mean":
            return data["x_train"].float().mean()
        return float(cfg.explain.baseline)

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        f, grid = meta["frames"], meta["size"] // meta["patch"]
        maps = {m: np.asarray(v).reshape(f, grid, grid) for m, v in importance.items()}
        ev = data["evidence_test"][i].numpy().reshape(f, grid, grid)
        return figures.video_overlay(data["x_test"][i, :, 0].numpy(), maps, ev, title)
