"""What every pipeline stage does, the same way for every experiment kind.

Each function takes the experiment kind (:mod:`attnlab.experiments`, which declares
only what differs), its validated params section and a :class:`~attnlab.layout.Layout`
whose current stage writes into its temporary directory. ``STAGE_FUNCTIONS`` maps
stage names to them; ``stages/<name>.py`` calls them through :func:`attnlab.pipeline.run`.

Train, extract, explain and evaluate run the model on the params file's ``device``
(:func:`~attnlab.config.stage_device`); the data stay on the CPU and every function that
feeds the model moves its batches to the model's device. What is saved is CPU numpy
arrays and a checkpoint of CPU tensors, whatever the device.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from attnlab import distributed, io
from attnlab.config import stage_device
from attnlab.experiments.base import Experiment
from attnlab.layout import Layout
from attnlab.pipeline.timing import stage_records, stage_times

if TYPE_CHECKING:          # torch is imported by the stages that run a model, not by a report's
    import torch


def load_dataset(lay: Layout) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The prepared arrays as tensors (float16 storage loaded as float32) and the meta."""
    import torch

    arrays = io.load_arrays(lay.dataset)
    data = {k: torch.from_numpy(v) for k, v in arrays.items()}
    data = {k: v.float() if v.dtype == torch.float16 else v for k, v in data.items()}
    return data, io.read_json(lay.meta)


# --------------------------------------------------------------------------- prepare, train, extract
def prepare(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    prepared = exp.prepare(cfg)
    io.save_arrays(lay.dataset, compress=prepared.compress, **prepared.arrays)
    io.write_json(lay.meta, prepared.meta)


def train(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    import torch

    from attnlab.models import build_model, save_checkpoint
    from attnlab.training import resumable

    data, meta = load_dataset(lay)
    factory, kwargs = exp.model_spec(cfg, meta)
    device = distributed.local_device(stage_device(cfg))
    torch.manual_seed(cfg.train.seed)
    model = build_model(factory, kwargs).to(device)      # initialised on the CPU: the same weights anywhere
    # a killed run resumes after its last complete epoch if the params, device, number of
    # processes and data are the same
    key = _fingerprint(cfg, factory, kwargs, lay.dataset, device=device, processes=distributed.world_size())
    with resumable(lay.resume("train"), key):
        history, metrics = exp.fit(cfg, model, data, progress=progress)
        if distributed.is_main():
            save_checkpoint(lay.model, model, factory, kwargs)
            history.to_csv(lay.history, index=False)
            io.write_json(lay.train_metrics, metrics | {"processes": distributed.world_size()})


def _fingerprint(cfg: Any, factory: str, kwargs: dict[str, Any], *files: Path, device: torch.device,
                 processes: int) -> str:
    """SHA-256 of the params, the model spec, the device, the number of processes and the
    content of ``files``."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), factory, kwargs, str(device), processes],
                                  sort_keys=True, default=str).encode())
    for path in files:
        io.hash_file(h, path)
    return h.hexdigest()


def extract(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    """The attention of the test samples (streamed to disk; every layer, head and query
    row unless ``extract.layers/heads/rows/dtype`` choose less), and the kind's other
    per-sample outputs (predictions, fusion weights)."""
    from attnlab.devices import take_rows
    from attnlab.store import extract_attention, merge_attention

    data, _ = load_dataset(lay)
    model = exp.load_model(cfg, lay).to(distributed.local_device(stage_device(cfg)))
    if _has_attention(model):                  # e.g. a fusion by weights has none
        x, bs = exp.test_inputs(data), cfg.extract.batch_size
        n = len(x[0] if isinstance(x, tuple) else x)
        start, stop = distributed.block(n)     # under torchrun: this process's block of samples
        batches = (take_rows(x, slice(i, min(i + bs, stop))) for i in range(start, stop, bs))
        e = cfg.extract
        held = dict(layers=e.layers, heads=e.heads, rows=e.rows, dtype=e.dtype)
        if not distributed.active():
            extract_attention(model, batches, lay.attention, forward=exp.forward, progress=progress, **held)
        else:                                  # one shard file per process (with samples), merged in sample order
            shards = {r: lay.attention.with_name(f".{lay.attention.stem}.shard{r}.h5")
                      for r in range(distributed.world_size()) if len(range(*distributed.block(n, r)))}
            if distributed.rank() in shards:
                extract_attention(model, batches, shards[distributed.rank()], forward=exp.forward,
                                  progress=progress and distributed.is_main(), **held)
            distributed.barrier()
            if distributed.is_main():
                merge_attention(list(shards.values()), lay.attention)
    if distributed.is_main():
        for name, arrays in exp.extract_outputs(cfg, model, data).items():
            io.save_arrays(getattr(lay, name), **arrays)


def _has_attention(model: torch.nn.Module) -> bool:
    """A recordable attention module (any adapter), or one that only looks like attention
    (then the recorder raises, naming it, instead of the stage skipping it)."""
    from attnlab.capture import attention_lookalikes, recordable_modules

    return bool(recordable_modules(model) or attention_lookalikes(model))


# --------------------------------------------------------------------------- aggregate
def aggregate(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    """``VocabAttention`` of the stored attention (no model run), one aggregation per
    view (a layer, the layer mean or the rollout), head mean and per head; kinds without
    a vocabulary write only ``summary.json`` saying so."""
    meta = io.read_json(lay.meta)
    if "vocab" not in meta:                    # said without loading the data (nor torch)
        if distributed.is_main():
            io.write_json(lay.aggregate_summary, {"vocabulary": False,
                                                  "reason": f"{lay.root.name}'s inputs have no token vocabulary"})
        return
    import pandas as pd

    from attnlab.aggregate_views import aggregate_views

    data, _ = load_dataset(lay)
    a = cfg.aggregate
    itos = meta["vocab"]
    causal, real = exp.head_masks(cfg, data)
    # under torchrun each process aggregates a block of the samples; the tables are summed by all-reduce
    views = aggregate_views(lay.attention, data["tokens_test"], real, len(itos),
                            attention=a.attention, layers=a.layers, heads=a.heads, batch_size=a.batch_size,
                            causal=causal, samples=distributed.block(len(data["tokens_test"])),
                            progress=progress and distributed.is_main())
    for agg in (agg for pair in views.values() for agg in pair if agg is not None):
        agg.all_reduce()
    if not distributed.is_main():
        return
    for view, (agg, per_head) in views.items():
        agg.save(lay.vocab(view))
        agg.to_frame(itos).to_csv(lay.vocab(view, kind="pairs"), index=False, float_format="%.6g",
                                  compression={"method": "gzip", "mtime": 0})   # reproducible bytes
        agg.top_pairs(a.top_k, min_count=a.min_count, itos=itos, exclude=a.exclude).to_csv(
            lay.vocab(view, kind="top_pairs"), index=False)
        if per_head is not None:
            per_head.save(lay.vocab(view, kind="head_matrices"))
            pd.concat([per_head.top_pairs(a.top_k, min_count=a.min_count, itos=itos, head=h,
                                          exclude=a.exclude).assign(head=h)
                       for h in range(per_head.nhead)]).to_csv(
                lay.vocab(view, kind="top_pairs_per_head"), index=False)
    io.write_json(lay.aggregate_summary, {"vocabulary": True, "views": list(views), "headline": next(iter(views)),
                                          "attention": a.attention, "heads": a.heads, "top_k": a.top_k,
                                          "min_count": a.min_count, "vocab_size": len(itos)})


# --------------------------------------------------------------------------- explain
def explain(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    """Every configured method's per-item importance for every explained sample
    (``importance.npz``: one ``[M, n_items]`` array per method, ``target`` and the kind's
    own arrays), and figures of a few samples."""
    e = cfg.explain
    data, meta = load_dataset(lay)
    model = exp.load_model(cfg, lay).to(stage_device(cfg))
    ex = exp.explained(cfg, data, meta)
    batches = [slice(i, i + e.batch_size) for i in range(0, len(ex), e.batch_size)]
    parts, targets = _explain_rows(e, model, ex, batches, exp.baseline(cfg, data), progress=progress)
    importance = {m: v.cpu().numpy().astype(np.float32) for m, v in parts.items()}   # saved
    target = targets.cpu().numpy()
    io.save_arrays(lay.importance, target=target, **ex.saved, **importance)
    _example_figures(exp, cfg, lay, data, meta, importance, target, ex.rows)


def _explain_rows(e: Any, model: torch.nn.Module, ex: Any, batches: list[slice | torch.Tensor], baseline: Any, *,
                  target: torch.Tensor | None = None, progress: bool = False,
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every method of ``e.methods`` on the explained samples of ``batches`` (slices or
    index tensors into ``ex``), one :func:`~attnlab.attribution.explain_batch` each, for
    ``target`` (default: the model's predictions): ``({method: [M, n_items]}, target [M])``."""
    import torch
    from tqdm.auto import tqdm

    from attnlab.attribution import explain_batch
    from attnlab.devices import take_rows

    parts: dict[str, list[torch.Tensor]] = {m: [] for m in e.methods}
    targets = []
    for picked in tqdm(batches, desc="explain", disable=not progress):
        index = torch.arange(len(ex))[picked]               # the explained samples of this batch
        imp, batch = explain_batch(e.methods, model, take_rows(ex.x, picked), ex.items.rows(picked), e,
                                   baseline=baseline, target=None if target is None else target[picked],
                                   forward=lambda m, xb, picked=picked: ex.forward(m, xb, picked),
                                   forward_rows=lambda m, xb, idx, index=index: ex.forward(m, xb, index[idx.cpu()]))
        for m in e.methods:
            parts[m].append(imp[m])
        targets.append(batch.target)
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(targets)


def _example_figures(exp: Experiment, cfg: Any, lay: Layout, data: dict[str, torch.Tensor], meta: dict[str, Any],
                     importance: dict[str, np.ndarray], target: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Figures of a few explained samples; ``rows``: the test sample of each explained one
    (None: the same index), so ``i`` below is always a test sample."""
    from attnlab.report import figures
    from attnlab.report.html import save_figure

    lay.explain_figures.mkdir()
    n = getattr(cfg.explain, "examples", 0)
    if not n or "y_test" not in data:
        return
    y, classes = data["y_test"].numpy(), meta["classes"]
    rows = np.arange(len(target)) if rows is None else np.asarray(rows)
    for j in figures.pick_examples(y[rows], n):
        i = int(rows[j])
        title = f"sample {i}: true {classes[y[i]]}, explained (predicted) {classes[target[j]]}"
        fig = exp.example_figure(data, meta, i, {m: v[j] for m, v in importance.items()}, title)
        if fig is not None:
            save_figure(fig, lay.explain_figures / f"sample{i}.png")


# --------------------------------------------------------------------------- evaluate
def evaluate(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    """Deletion/insertion of every method beside a seeded random baseline, evidence AUROC
    and pointing game where the data have planted evidence (each with bootstrap intervals
    over samples and a paired test against random), deletion and insertion again with
    the ROAD masker where ``evaluate.debiased``, the randomisation sanity check of every
    method (``evaluate.sanity``), the knockout diagnostic (``evaluate.knockout``: does the
    attention to a method's top-k items carry the prediction, per layer and head?), the
    kind's ground truth, and per-head diagnostics (entropy, sink score, locality, ablation)
    of the stored attention."""
    import torch

    from attnlab.devices import to_device
    from attnlab.evaluate import random_importance
    from attnlab.evaluate.summaries import perturbation_curves, self_attention_only, write_curves
    from attnlab.report import figures
    from attnlab.report.html import save_figure

    ev = cfg.evaluate
    res = lay.results
    (res / "figures").mkdir(parents=True)
    data, meta = load_dataset(lay)
    device = stage_device(cfg)
    model = exp.load_model(cfg, lay).to(device)
    ex = exp.explained(cfg, data, meta)
    stored = io.load_arrays(lay.importance)
    importance = {m: torch.from_numpy(stored[m]) for m in cfg.explain.methods}
    importance["random"] = random_importance((len(ex), ex.items.n_items), ev.seed).float()
    if ex.valid is not None:                   # items that cannot matter are ranked last by every method
        importance = {m: v.masked_fill(~ex.valid, -1.0) for m, v in importance.items()}
    target = torch.from_numpy(stored["target"])

    pert = exp.perturbation(cfg, model, data, meta, ex)
    # the perturbed inputs are made where the model runs (the curves follow x's device)
    pert = replace(pert, x=to_device(pert.x, device), forward_kwargs=to_device(pert.forward_kwargs, device))
    stats = dict(resamples=ev.resamples, seed=ev.seed, alpha=ev.alpha)
    valid = None if ex.valid is None else ex.valid.to(device)
    aucs, curves = perturbation_curves(pert.fn, pert.x, importance, pert.masker, target=target, steps=ev.steps,
                                       batch_size=ev.batch_size, forward_kwargs=pert.forward_kwargs, valid=valid,
                                       **stats)
    write_curves(curves, lay.dir("evaluate"))
    save_figure(figures.faithfulness_curves(curves), res / "figures" / "faithfulness.png")
    metrics: dict[str, Any] = {"n_samples": len(ex), "faithfulness": aucs,
                               "significance": {"alpha": ev.alpha, "resamples": ev.resamples}}
    if ex.y is not None:
        metrics["accuracy"] = float((target == ex.y).float().mean())
    if ex.evidence is not None:
        metrics["evidence"], metrics["evidence_ci"], metrics["evidence_vs_random"] = _evidence_scores(
            importance, ex.evidence, ex.valid, **stats)
    if getattr(ev, "debiased", False):
        road = _road(pert, importance, aucs, target, ev)
        if road is not None:
            metrics["road"] = road
    if ev.sanity.samples:
        metrics["sanity"] = _sanity(exp, cfg, model, data, ex, stored, target)
        save_figure(figures.sanity_curves(metrics["sanity"]), res / "figures" / "sanity.png")
    knockout = getattr(ev, "knockout", None)
    if knockout is not None and knockout.samples and ex.items.kind != "streams" and _has_attention(model):
        metrics["knockout"] = _knockout(cfg, lay, model, ex, importance, target)
    _merge(metrics, exp.ground_truth(cfg, lay, model, data, meta, ex))
    if lay.attention.exists() and self_attention_only(lay.attention):
        metrics["heads"] = _heads(exp, cfg, lay, model, data, pert, ex.y, progress=progress)
    io.write_json(lay.metrics, metrics)


def _evidence_scores(importance: dict[str, torch.Tensor], evidence: torch.Tensor, valid: torch.Tensor | None, *,
                     resamples: int, seed: int, alpha: float) -> tuple[dict[str, Any], ...]:
    """Evidence AUROC and pointing game of every method (means over samples), their 95%
    bootstrap intervals and the paired test against random, as three dicts keyed by score
    (``evidence`` keeps only the means, as before; ``evidence_ci``, ``evidence_vs_random``)."""
    from attnlab.evaluate import evidence_auroc, pointing_hits
    from attnlab.evaluate.uncertainty import uncertainty

    means: dict[str, Any] = {}
    ci: dict[str, Any] = {}
    tests: dict[str, Any] = {}
    per_sample = {"auroc": {m: evidence_auroc(v, evidence, valid=valid).per_sample.numpy()
                            for m, v in importance.items()},
                  "pointing_game": {m: pointing_hits(v, evidence, valid=valid).numpy() for m, v in importance.items()}}
    for score, values in per_sample.items():
        means[score] = {m: float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan") for m, v in values.items()}
        ci[score], tests[score] = uncertainty(values, higher_is_better=True, resamples=resamples, seed=seed,
                                              alpha=alpha)
    return means, ci, tests


def _sanity(exp: Experiment, cfg: Any, model: torch.nn.Module, data: dict[str, torch.Tensor], ex: Any,
            stored: dict[str, np.ndarray], target: torch.Tensor) -> dict[str, Any]:
    """The randomisation test (:func:`~attnlab.evaluate.sanity.sanity_check`) of every
    explain method on ``evaluate.sanity.samples`` explained samples spread evenly over
    them (test sets are often ordered by class or condition), explained again, for the
    same targets, exactly as the explain stage does."""
    import torch

    from attnlab.devices import model_device, take_rows, to_device
    from attnlab.evaluate.sanity import sanity_check

    e, s = cfg.explain, cfg.evaluate.sanity
    picked = torch.linspace(0, len(ex) - 1, min(s.samples, len(ex))).round().long().unique()
    baseline = exp.baseline(cfg, data)
    first = picked[:2]
    return sanity_check(model, lambda m: _explain_rows(e, m, ex, list(picked.split(e.batch_size)), baseline,
                                                       target=target)[0], {m: torch.from_numpy(stored[m][picked.numpy()]) for m in e.methods},
                        lambda m: ex.forward(m, to_device(take_rows(ex.x, first), model_device(m)), first),
                        valid=None if ex.valid is None else ex.valid[picked], threshold=s.threshold,
                        independent=s.independent, seed=cfg.evaluate.seed)


def _road(pert: Any, importance: dict[str, torch.Tensor], constant: dict[str, Any], target: torch.Tensor,
          ev: Any) -> dict[str, Any] | None:
    """Deletion with the ROAD masker over the same items as the kind's constant masker
    (noise ``ev.road_noise`` × the std of the perturbed inputs), and insertion (from
    every item imputed), their intervals and tests, and whether the ranking by deletion
    AUC is the same as with the constant baseline (``same_ranking``;
    ``rank_correlation``: Kendall's tau between the two; ``*_insertion``: the same for
    insertion). None where the items cannot be interpolated (token ids, fusion streams)."""
    import torch
    from scipy.stats import kendalltau

    from attnlab.evaluate import road_like
    from attnlab.evaluate.summaries import perturbation_curves

    if not torch.is_floating_point(pert.x):
        return None
    masker = road_like(pert.masker, noise=ev.road_noise, seed=ev.seed, reference=pert.x)
    if masker is None:
        return None
    aucs, _ = perturbation_curves(pert.fn, pert.x, importance, masker, target=target, steps=ev.steps,
                                  batch_size=ev.batch_size, forward_kwargs=pert.forward_kwargs,
                                  resamples=ev.resamples, seed=ev.seed, alpha=ev.alpha)
    methods = list(constant["deletion_auc"])
    out = dict(aucs)
    for mode, suffix in (("deletion", ""), ("insertion", "_insertion")):
        key = f"{mode}_auc"
        before = sorted(methods, key=lambda m: constant[key][m])
        after = sorted(methods, key=lambda m: aucs[key][m])
        tau = kendalltau([constant[key][m] for m in methods], [aucs[key][m] for m in methods])
        out[f"same_ranking{suffix}"] = before == after
        out[f"rank_correlation{suffix}"] = float(tau.statistic) if len(methods) > 1 else 1.0
    return out


def _knockout(cfg: Any, lay: Layout, model: torch.nn.Module, ex: Any, importance: dict[str, torch.Tensor],
              target: torch.Tensor) -> dict[str, Any]:
    """The knockout diagnostic (:mod:`attnlab.evaluate.knockout`) on ``evaluate.knockout.samples``
    explained samples spread evenly over them: per layer and head, the drop of the explained
    logit when the explained rows' attention to the top-``k`` items of ``evaluate.knockout.method``
    is blocked, against ``k`` random items; ``knockout.csv`` (every unit) and a summary of the
    all-heads units for metrics.json."""
    import torch

    from attnlab.devices import model_device, take_rows, to_device
    from attnlab.evaluate.knockout import knockout_drops, knockout_table, knockout_units, random_items, top_items

    ev = cfg.evaluate
    kn = ev.knockout
    method = kn.chosen(list(cfg.explain.methods))
    if method not in cfg.explain.methods:
        raise ValueError(f"evaluate.knockout.method: {method!r} is not among explain.methods "
                         f"({', '.join(cfg.explain.methods)})")
    picked = torch.linspace(0, len(ex) - 1, min(kn.samples, len(ex))).round().long().unique()
    top = top_items(importance[method][picked], kn.k)
    rand = random_items(len(picked), ex.items.n_items, kn.k, seed=ev.seed,
                        valid=None if ex.valid is None else ex.valid[picked])
    spacetime = ex.items.kind == "spacetime"
    device = model_device(model)
    units, tops, rands = None, [], []
    for start in range(0, len(picked), ev.batch_size):
        rows = picked[start:start + ev.batch_size]
        xb = to_device(take_rows(ex.x, rows), device)
        run = lambda xb=xb, rows=rows: ex.forward(model, xb, rows)  # noqa: E731
        found, base = knockout_units(model, run, spacetime=spacetime)
        units = units or found
        how = None if spacetime else ex.items.rows(rows).how
        for items, out in ((top, tops), (rand, rands)):
            out.append(knockout_drops(model, run, target[rows], items[start:start + len(rows)], units, rows=how,
                                      n_items=ex.items.n_items, base=base, spacetime=spacetime).cpu())
    table = knockout_table(units, torch.cat(tops, 1), torch.cat(rands, 1), resamples=ev.resamples, seed=ev.seed,
                           alpha=ev.alpha)
    table.to_csv(lay.results / "knockout.csv", index=False, float_format="%.6g")
    layers = table[table["head"] == "all"]
    keep = ["topk", "topk_lo", "topk_hi", "random", "random_lo", "random_hi", "p", "carries"]
    return {"method": method, "k": kn.k, "samples": len(picked),
            "units_carrying": int(table["carries"].sum()), "units": len(table),
            "layers": {str(r["layer"]): {c: bool(r[c]) if c == "carries" else float(r[c]) for c in keep}
                       for r in layers.to_dict("records")}}


def _merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _heads(exp: Experiment, cfg: Any, lay: Layout, model: torch.nn.Module, data: dict[str, torch.Tensor],
           pert: Any, y: torch.Tensor | None, *, progress: bool) -> dict[str, Any]:
    """``heads.csv`` (one row per recorded head), its figure, and the summary for metrics.json:
    the stored attention's head statistics over every test sample; head ablation over the
    explained samples (``pert.x``; labels ``y``, or None: the drop in confidence only)."""
    import pandas as pd

    from attnlab.evaluate import head_importance
    from attnlab.evaluate.summaries import ablation_module, head_summary, head_table
    from attnlab.report import figures
    from attnlab.report.html import save_figure
    from attnlab.store import AttentionReader

    ev = cfg.evaluate
    causal, real = exp.head_masks(cfg, data)
    with AttentionReader(lay.attention) as reader:
        names = list(reader.names)
        heads = head_table(reader, k=ev.sink_k, batch_size=ev.batch_size, causal=causal, mask=real)
    # head ablation zeroes a head's slice of out_proj: the recorded module (an
    # nn.MultiheadAttention) or the attention module holding a recorded AttentionProbs
    ablatable = {n: a for n in dict.fromkeys(names) if (a := ablation_module(model, n)) is not None}
    if getattr(ev, "ablation", False) and ablatable:   # without labels (a model trained elsewhere): prob_drop only
        more = pert.forward_kwargs or {}
        batches = [((pert.x[i:i + ev.batch_size], {k: v[i:i + ev.batch_size] for k, v in more.items()}),
                    None if y is None else y[i:i + ev.batch_size]) for i in range(0, len(pert.x), ev.batch_size)]
        ablated = head_importance(model, batches, list(ablatable.values()),
                                  forward=lambda _, inputs: pert.fn(inputs[0], **inputs[1]), progress=progress)
        recorded = {a: n for n, a in ablatable.items()}
        drops = pd.DataFrame([{"module": recorded[name], "head": h, "accuracy_drop": float(ablated.accuracy_drop[l, h]),
                               "prob_drop": float(ablated.prob_drop[l, h])}
                              for l, name in enumerate(ablated.names)
                              for h in range(ablated.accuracy_drop.shape[1])
                              if not np.isnan(float(ablated.prob_drop[l, h]))])
        heads = heads.merge(drops, on=["module", "head"], how="left")
    heads.to_csv(lay.results / "heads.csv", index=False, float_format="%.6g")
    columns = ["entropy", "sink", "locality_norm"] + [c for c in ("prob_drop", "accuracy_drop")
                                                      if c in heads and heads[c].notna().any()]
    save_figure(figures.head_heatmaps(heads, columns), lay.results / "figures" / "heads.png")
    return head_summary(heads)


# --------------------------------------------------------------------------- report, track
def report(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    from attnlab.report import write_report

    write_report(exp, cfg, lay)


def track(exp: Experiment, cfg: Any, lay: Layout, *, progress: bool = False) -> None:
    """Log this pipeline state (params, metrics, model, attention, aggregation,
    explanations, report) to MLflow as one run. A model trained elsewhere is logged by
    reference: its factory, arguments, weights file and the weights' SHA-256 (params
    ``model.*`` and the artifact ``model/model_reference.json``), never copied or pickled.
    The run starts and ends when the stages of this state did (their recorded timings;
    each stage's time, processes and threads are tags ``attnlab.stage.<stage>``),
    has the prepared data as its training dataset, and the model a signature and an
    input example (one test sample). The state's live run, which the earlier stages
    logged into as they ran (:mod:`attnlab.pipeline.runner`), is the run finished here,
    with only what it does not hold yet."""
    import pandas as pd

    import attnlab.tracking as tracking
    from attnlab.config import flatten
    from attnlab.devices import take_rows
    from attnlab.layout import STAGES

    stage_dirs = {name: lay.dir(name) for name in ("train", "extract", "aggregate", "explain", "evaluate", "report")}
    recorded = [p for d in stage_dirs.values() for p in sorted(d.rglob("*")) if p.is_file()]
    reference = exp.model_reference(cfg, lay)
    metrics = {} if reference else {f"final.{k}": v for k, v in io.read_json(lay.train_metrics).items()}
    metrics.update(tracking.flat_metrics(io.read_json(lay.metrics), "evaluate"))
    instance = lay.root.name                   # the MLflow experiment: one per instance
    params = flatten(cfg) | ({"kind": exp.name} if exp.name != instance else {})
    artifacts = {("attention" if k == "extract" else k): d for k, d in stage_dirs.items() if k != "train"}
    if reference:
        params["model.weights_sha256"] = reference["weights_sha256"]
        artifacts["model"] = lay.dir("track") / "model_reference.json"
        io.write_json(artifacts["model"], reference)
        recorded.append(artifacts["model"])
    else:
        artifacts["checkpoint"] = lay.model    # the weights, loadable without unpickling code
    model = example = None
    if not reference:
        model = exp.load_model(cfg, lay)
        batch = take_rows(exp.test_inputs(load_dataset(lay)[0]), slice(0, 1))
        example = tracking.model_example(model, lambda: exp.forward(model, batch))
    records = stage_records(lay, [s for s in STAGES[:STAGES.index("track")] if lay.dir(s).is_dir()])
    start, end, untimed = stage_times(records)
    source = io.read_json(lay.meta).get("source")
    run_id, created = tracking.log_pipeline_run(
        instance, params=params, metrics=metrics, files=recorded,
        history=None if reference else pd.read_csv(lay.history),
        model=model, model_example=example, artifacts=artifacts,
        dataset=lay.dataset, dataset_name=f"{instance}/{source}" if source else instance,
        start_time=start, end_time=end, untimed=untimed,
        stages={stage: record for stage, record in records.items() if record is not None})
    io.write_json(lay.run, {"experiment": instance, "run_id": run_id})
    print(f"{instance}: MLflow run {run_id} ({'logged' if created else 'already logged'})")


STAGE_FUNCTIONS: dict[str, Callable[..., None]] = {
    "prepare": prepare, "train": train, "extract": extract, "aggregate": aggregate, "explain": explain,
    "evaluate": evaluate, "report": report, "track": track}
