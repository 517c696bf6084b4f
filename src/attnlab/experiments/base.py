"""The stage logic shared by classification experiments.

An experiment subclass says how to *prepare* its data and which model to build;
training, attention extraction, the report and MLflow tracking are the same for all.
Files per stage (all under ``data/<experiment>/<stage>/``):

* prepare: ``dataset.npz`` (x_train, y_train, x_test, y_test[, evidence_test]), ``meta.json``
* train:   ``model.pt`` (checkpoint), ``metrics.json``, ``history.csv``
* extract: ``attention.h5`` (every layer's per-head attention of each test sample),
  ``predictions.npz`` (y, pred, prob)
* explain: ``importance.npz`` (per method ``[N, n_items]``, target, y), ``figures/*.png``
* evaluate: ``metrics.json``, ``deletion.csv``, ``insertion.csv``, ``heads.csv``, ``figures/``
* report:  ``report.html`` (self-contained), ``figures/*.png``
* track:   ``run.json`` (the MLflow run holding this pipeline state)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnlab import io
from attnlab.config import Section, flatten
from attnlab.models import load_checkpoint, save_checkpoint


class ClassifierExperiment:
    """Base class; subclasses set ``name`` and implement ``prepare`` and ``model_spec``."""

    name: str = ""
    item_name: str = "item"          # what the attention's tokens are: timestep, frame, token...

    # ------------------------------------------------------------------ per experiment
    def prepare(self, cfg: Section, out: Path) -> None:
        raise NotImplementedError

    def model_spec(self, cfg: Section, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(factory, kwargs)`` for :func:`attnlab.models.build_model`."""
        raise NotImplementedError

    def forward(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return model(xb)

    def param_groups(self, cfg: Section, model: nn.Module) -> list[dict] | None:
        """Optimizer parameter groups for training (None: one group at ``train.lr``)."""
        return None

    # ------------------------------------------------------------------ shared stages
    @staticmethod
    def load_dataset(prepared: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        arrays = io.load_arrays(prepared / "dataset.npz")
        data = {k: torch.from_numpy(v) for k, v in arrays.items()}
        data = {k: v.float() if v.dtype == torch.float16 else v for k, v in data.items()}  # stored compact
        return data, io.read_json(prepared / "meta.json")

    def train(self, cfg: Section, prepared: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.models import build_model
        from attnlab.training import fit_classifier

        data, meta = self.load_dataset(prepared)
        factory, kwargs = self.model_spec(cfg, meta)
        torch.manual_seed(cfg.train.seed)
        model = build_model(factory, kwargs)
        history = fit_classifier(model, data["x_train"], data["y_train"], data["x_test"], data["y_test"],
                                 cfg.train, forward=self.forward, param_groups=self.param_groups(cfg, model),
                                 progress=progress)
        save_checkpoint(out / "model.pt", model, factory, kwargs)
        history.to_csv(out / "history.csv", index=False)
        final = history.iloc[-1]
        io.write_json(out / "metrics.json", {
            "test_accuracy": float(final["test_accuracy"]),
            "test_macro_f1": float(final["test_macro_f1"]),
            "test_loss": float(final["test_loss"]),
            "train_accuracy": float(final["train_accuracy"]),
            "epochs": int(final["epoch"]),
        })

    def extract(self, cfg: Section, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.store import extract_attention
        from attnlab.training import predict

        data, _ = self.load_dataset(prepared)
        model = load_checkpoint(trained / "model.pt")
        x, y = data["x_test"], data["y_test"]
        batches = (x[i:i + cfg.extract.batch_size] for i in range(0, len(x), cfg.extract.batch_size))
        extract_attention(model, batches, out / "attention.h5",
                          forward=self.forward, progress=progress)
        prob = predict(model, x, forward=self.forward).softmax(-1)
        io.save_arrays(out / "predictions.npz", y=y.numpy(), pred=prob.argmax(-1).numpy(),
                       prob=prob.numpy().astype(np.float32))

    def readout_how(self, model: nn.Module) -> str:
        """How a joint token x token matrix becomes per-item importance for this model."""
        return "cls" if getattr(model, "pooling", "mean") == "cls" else "mean"

    def example_figure(self, data: dict[str, torch.Tensor], meta: dict[str, Any], i: int,
                       importance: dict[str, np.ndarray], title: str):
        """The figure of one explained test sample (importance of every method)."""
        from attnlab.report import figures

        x = data["x_test"][i].numpy()
        evidence = data["evidence_test"][i].numpy() if "evidence_test" in data else None
        return figures.importance_bands(importance, title, self.item_name,
                                        x_tf=x if x.ndim == 2 else None, channels=meta.get("channels", ()),
                                        evidence=evidence)

    def baseline_value(self, cfg: Section, data: dict[str, torch.Tensor]) -> float | torch.Tensor:
        """What a removed item is replaced by: a number, or the training mean per feature."""
        if cfg.explain.baseline == "mean":
            x = data["x_train"]
            return x.float().mean(dim=(0, 1))
        return float(cfg.explain.baseline)

    def importance_batch(self, cfg: Section, model: nn.Module, xb: torch.Tensor, n_items: int,
                         baseline: float | torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every configured method's ``[B, n_items]`` importance for the predicted class."""
        from attnlab.attribution import ATTENTION_METHODS, attention_importance, to_items
        from attnlab.evaluate import input_x_gradient, integrated_gradients

        e = cfg.explain
        imp, target = attention_importance(
            model, xb, n_items=n_items, methods=[m for m in e.methods if m in ATTENTION_METHODS],
            how=self.readout_how(model), head_fusion=e.head_fusion, residual=e.residual,
            discard_ratio=e.discard_ratio, flow_max_pairs=e.flow_max_pairs, forward=self.forward)
        fn = lambda inputs: self.forward(model, inputs)  # noqa: E731
        if "input_x_gradient" in e.methods:
            imp["input_x_gradient"] = to_items(input_x_gradient(fn, xb, target), n_items)
        if "integrated_gradients" in e.methods:
            base = baseline if isinstance(baseline, float) else baseline.expand_as(xb)
            imp["integrated_gradients"] = to_items(
                integrated_gradients(fn, xb, target, n_steps=e.ig_steps, baseline=base), n_items)
        return {m: imp[m] for m in e.methods}, target

    def explain(self, cfg: Section, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        """Importance of every method for every test sample -> importance.npz, figures/."""
        from tqdm.auto import tqdm

        from attnlab.report import figures
        from attnlab.report.html import save_figure

        e = cfg.explain
        data, meta = self.load_dataset(prepared)
        model = load_checkpoint(trained / "model.pt")
        x, y = data["x_test"], data["y_test"]
        baseline = self.baseline_value(cfg, data)
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in e.methods}
        targets = []
        for i in tqdm(range(0, len(x), e.batch_size), desc="explain", disable=not progress):
            imp, target = self.importance_batch(cfg, model, x[i:i + e.batch_size], meta["n_items"], baseline)
            for m in e.methods:
                parts[m].append(imp[m])
            targets.append(target)
        importance = {m: torch.cat(v).numpy().astype(np.float32) for m, v in parts.items()}
        target = torch.cat(targets).numpy()
        io.save_arrays(out / "importance.npz", target=target, y=y.numpy(), **importance)
        (out / "figures").mkdir()
        classes = meta["classes"]
        for i in figures.pick_examples(y.numpy(), e.examples):
            title = f"sample {i}: true {classes[y[i]]}, explained (predicted) {classes[target[i]]}"
            fig = self.example_figure(data, meta, i, {m: v[i] for m, v in importance.items()}, title)
            save_figure(fig, out / "figures" / f"sample{i}.png")

    def masker(self, cfg: Section, data: dict[str, torch.Tensor]):
        """How items are removed for the deletion/insertion tests (items along dim 1)."""
        from attnlab.evaluate import sequence_masker

        return sequence_masker(self.baseline_value(cfg, data))

    def perturbation_inputs(self, cfg: Section, model: nn.Module, data: dict[str, torch.Tensor]):
        """What the deletion/insertion tests and head ablation run: ``(fn, x, masker)``
        with ``fn(x') -> logits`` and ``masker`` removing items of ``x``. By default the
        model on the test inputs; an experiment may substitute an exactly equivalent,
        cheaper pair (e.g. cached per-item embeddings)."""
        return (lambda inputs: self.forward(model, inputs)), data["x_test"], self.masker(cfg, data)

    def evaluate(self, cfg: Section, root: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.experiments.evaluation import evaluate_classifier

        evaluate_classifier(self, cfg, root, out, progress=progress)

    def report(self, cfg: Section, root: Path, out: Path) -> None:
        from attnlab.report.classifier import write_classifier_report

        write_classifier_report(self, cfg, root, out)

    def track(self, cfg: Section, root: Path, out: Path) -> None:
        """Log this pipeline state (params, metrics, model, attention, report) to MLflow."""
        import pandas as pd

        from attnlab import tracking

        stage_dirs = {name: root / name for name in ("train", "extract", "explain", "evaluate", "report")}
        train, evaluate = stage_dirs["train"], stage_dirs["evaluate"]
        recorded = [p for d in stage_dirs.values() for p in sorted(d.rglob("*")) if p.is_file()]
        metrics = {f"final.{k}": v for k, v in io.read_json(train / "metrics.json").items()}
        metrics.update(tracking.flat_metrics(io.read_json(evaluate / "metrics.json"), "evaluate"))
        run_id, created = tracking.log_pipeline_run(
            self.name, params=flatten(cfg), metrics=metrics, files=recorded,
            history=pd.read_csv(train / "history.csv"),
            model=load_checkpoint(train / "model.pt"),
            artifacts={("attention" if k == "extract" else k): d for k, d in stage_dirs.items() if k != "train"})
        io.write_json(out / "run.json", {"experiment": self.name, "run_id": run_id})
        print(f"{self.name}: MLflow run {run_id} ({'logged' if created else 'already logged'})")
