"""``frames`` and ``video``: clips of real digits (scikit-learn) with planted evidence.

``frames``: ``[B, T, 1, H, W]`` clips whose class is decided by a few key frames
(evidence per frame) -> per-frame CNN -> ``nn.TransformerEncoder`` -> mean pooling.
``video``: a digit moving across the canvas (evidence per frame and patch) -> a
divided space-time transformer (TimeSformer-style); its explanations are read out
with :func:`~attnlab.explain.spacetime_rollout` over frames x patches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnlab import io
from attnlab.config import FramesParams, VideoParams
from attnlab.experiments.base import ClassifierExperiment

CLASSES = [str(d) for d in range(10)]


def _save_clips(out: Path, train: dict, test: dict, meta: dict[str, Any]) -> None:
    # pixels in [0, 1] plus Gaussian noise: float16 (loaded as float32) halves the file,
    # and zlib would spend seconds on incompressible noise
    io.save_arrays(out / "dataset.npz", compress=False, x_train=train["x"].half().numpy(),
                   y_train=train["y"].numpy(), x_test=test["x"].half().numpy(), y_test=test["y"].numpy(),
                   evidence_test=test["evidence"].numpy())
    io.write_json(out / "meta.json", {"classes": CLASSES, "n_train": len(train["y"]),
                                      "n_test": len(test["y"]), **meta})


class FramesExperiment(ClassifierExperiment):
    name = "frames"
    item_name = "frame"

    def prepare(self, cfg: FramesParams, out: Path) -> None:
        from attnlab.data.clips import make_frame_clips

        p = cfg.prepare
        kw = dict(frames=p.frames, size=p.size, n_key=p.n_key, distractor=p.distractor, noise=p.noise,
                  scale=p.scale)
        train = make_frame_clips(p.n_train, split="train", seed=p.seed, **kw)
        test = make_frame_clips(p.n_test, split="test", seed=p.seed + 1, **kw)
        _save_clips(out, train, test, {"source": "sklearn digits, key frames among distractors",
                                       "n_items": p.frames})

    def model_spec(self, cfg: FramesParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "attnlab.models.frames:frames_classifier", {"n_classes": len(meta["classes"]),
                                                           **cfg.model.model_dump()}

    def perturbation_inputs(self, cfg: FramesParams, model: nn.Module, data: dict[str, torch.Tensor]):
        """The CNN embeds every frame on its own (in eval mode BatchNorm uses its running
        statistics), so a clip with frames removed has the embeddings of its kept frames
        and the baseline frame's embedding elsewhere. The tests therefore perturb cached
        embeddings ``[N, T, D]`` and run only the encoder: the same logits, with the CNN
        run once per test frame instead of once per perturbed clip."""
        from attnlab.evaluate import sequence_masker

        model.eval()
        x = data["x_test"]
        base = torch.as_tensor(self.baseline_value(cfg, data), dtype=torch.float32)
        with torch.no_grad():
            h = torch.cat([model.embed(x[i:i + 256]) for i in range(0, len(x), 256)])
            fill = model.embed(base.expand(1, 1, *x.shape[2:]))[0, 0]                # [D]
        return model.forward_embedded, h, sequence_masker(fill)

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        return figures.frame_strip(data["x_test"][i, :, 0].numpy(), importance,
                                   data["evidence_test"][i].numpy(), title)


class VideoExperiment(ClassifierExperiment):
    """Items are the ``F·P`` patches of all frames, frame-major, patches row-major."""

    name = "video"
    item_name = "patch"

    def prepare(self, cfg: VideoParams, out: Path) -> None:
        from attnlab.data.clips import make_video_clips

        p = cfg.prepare
        kw = dict(frames=p.frames, size=p.size, patch=p.patch, noise=p.noise, clutter=p.clutter,
                  max_speed=p.max_speed, scale=p.scale)
        train = make_video_clips(p.n_train, split="train", seed=p.seed, **kw)
        test = make_video_clips(p.n_test, split="test", seed=p.seed + 1, **kw)
        grid = p.size // p.patch
        _save_clips(out, train, test, {"source": "sklearn digits moving across a canvas",
                                       "frames": p.frames, "patches": grid * grid, "patch": p.patch,
                                       "size": p.size, "n_items": p.frames * grid * grid})

    def model_spec(self, cfg: VideoParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "attnlab.models.spacetime:DividedSpaceTimeTransformer", {
            "n_classes": len(meta["classes"]), "frames": meta["frames"], "size": meta["size"],
            "patch": meta["patch"], **cfg.model.model_dump()}

    def masker(self, cfg: VideoParams, data: dict[str, torch.Tensor]):
        from attnlab.evaluate import patch_masker

        f, _, size = data["x_test"].shape[1:4]
        patch = size // int(round((data["evidence_test"].shape[-1]) ** 0.5))
        return patch_masker(f, patch, size, self.baseline_value(cfg, data))

    def baseline_value(self, cfg: VideoParams, data: dict[str, torch.Tensor]) -> float | torch.Tensor:
        if cfg.explain.baseline == "mean":
            return data["x_train"].float().mean()
        return float(cfg.explain.baseline)

    def importance_batch(self, cfg: VideoParams, model: nn.Module, xb: torch.Tensor, n_items: int,
                         baseline: float | torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """raw: last block's class-token space attention (its per-frame copies, / F);
        received: space attention each patch receives, mean over blocks, heads and
        queries; rollout / grad_rollout: space-time rollouts of the class token."""
        from attnlab.attribution import record_target, to_items
        from attnlab.evaluate import input_x_gradient, integrated_gradients
        from attnlab.explain import spacetime_grad_rollout, spacetime_rollout

        e = cfg.explain
        unsupported = sorted(set(e.methods) & {"flow"})
        if unsupported:
            raise ValueError(f"video.explain.methods: {unsupported[0]!r} is not defined for divided "
                             "space-time attention; use raw, received, rollout, grad_rollout, "
                             "input_x_gradient, integrated_gradients")
        atts, grads, target = record_target(model, xb)
        space, time = model.split_attentions(atts)
        space_g, time_g = model.split_attentions(grads)
        fuse = {"mean": lambda a: a.mean(2), "max": lambda a: a.amax(2), "min": lambda a: a.amin(2)}[e.head_fusion]
        frames = space[0].shape[1]
        imp: dict[str, torch.Tensor] = {}
        for m in e.methods:
            if m == "raw":
                rel = fuse(space[-1])[:, :, 0, 1:] / frames                       # [B, F, P]
            elif m == "received":
                rel = torch.stack([fuse(s)[..., 1:].mean(2) for s in space]).mean(0)
            elif m == "rollout":
                rel = spacetime_rollout(space, time, head_fusion=e.head_fusion, residual=e.residual)
            elif m == "grad_rollout":
                rel = spacetime_grad_rollout(space, time, space_g, time_g)
            elif m == "input_x_gradient":
                rel = input_x_gradient(model, xb, target, patch=model.patch)
            else:
                base = baseline if isinstance(baseline, float) else float(baseline)
                rel = integrated_gradients(model, xb, target, n_steps=e.ig_steps, baseline=base, patch=model.patch)
            imp[m] = to_items(rel.detach().flatten(1).float(), n_items)
        return imp, target

    def example_figure(self, data, meta, i, importance, title):
        from attnlab.report import figures

        f, grid = meta["frames"], meta["size"] // meta["patch"]
        maps = {m: np.asarray(v).reshape(f, grid, grid) for m, v in importance.items()}
        ev = data["evidence_test"][i].numpy().reshape(f, grid, grid)
        return figures.video_overlay(data["x_test"][i, :, 0].numpy(), maps, ev, title)
