"""A small, seeded, deterministic training loop for classifiers.

Interrupted training resumes: inside :func:`resumable` the loops write a checkpoint of
the model, optimizer, schedule, epoch, history and random-number states after every
epoch (atomically: a temporary file renamed), and a later run inside ``resumable`` with
the same key (a fingerprint of the params and data) continues after its last complete
epoch and reaches the same weights, bit for bit, as an uninterrupted run (CPU).

The loops run on the model's device: each batch is moved there (the data stay where
they are, and the shuffling uses a CPU generator, so the batches are the same whatever
the device).

Under ``torchrun`` (:mod:`attnlab.distributed`) the same loops train with DDP: each
process takes its shard of every global batch and its share of the batch's mean loss,
so a step's gradient is the one-process gradient; the per-epoch test metrics are
computed on shards and combined, and only process 0 shows progress and writes the
resume file.
"""
from __future__ import annotations

import contextlib
import contextvars
import glob
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from attnlab import distributed
from attnlab.devices import model_device, take_rows, to_device

if TYPE_CHECKING:
    import pandas as pd

#: ``cfg`` below is a params ``train`` section (:class:`attnlab.config.Train`); this module
#: does not import the params schema (which sits above it).
Train = Any

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _plain(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    return model(xb)


# --------------------------------------------------------------------------- resuming
_RESUME: contextvars.ContextVar[tuple[Path, str] | None] = contextvars.ContextVar("attnlab_resume", default=None)


# --------------------------------------------------------------------------- live metrics
_ON_EPOCH: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "attnlab_on_epoch", default=None)


@contextlib.contextmanager
def on_epoch(callback: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Inside the block, :func:`fit_classifier` and :func:`fit_lm` call ``callback(row)``
    with each epoch's history row (``{"epoch": 3, "train_loss": ..., ...}``) as soon as
    the epoch ends (process 0 only under torchrun), and with the rows of the epochs a
    resumed training restored first. The stage runner streams them to MLflow."""
    token = _ON_EPOCH.set(callback)
    try:
        yield
    finally:
        _ON_EPOCH.reset(token)


def _report(rows: list[dict[str, Any]]) -> None:
    """Hand ``rows`` to the :func:`on_epoch` callback; ``ATTNLAB_SLOW_EPOCH=<seconds>``
    makes every epoch last at least that long (a demonstration or a test of live metrics
    on a tiny model; nothing else changes)."""
    callback = _ON_EPOCH.get()
    if callback is not None and distributed.is_main():
        for row in rows:
            callback(dict(row))


def _pace(started: float) -> None:
    slow = float(os.environ.get("ATTNLAB_SLOW_EPOCH") or 0)
    if slow > 0:
        time.sleep(max(0.0, slow - (time.monotonic() - started)))


@contextlib.contextmanager
def resumable(path: str | Path, key: str) -> Iterator[None]:
    """Inside the block, :func:`fit_classifier` and :func:`fit_lm` checkpoint every epoch
    to ``path`` and resume from it when it was written with the same ``key``; a file with
    another key (changed params or data) or an unreadable one is ignored and overwritten.
    The file is removed when the block completes without error (with the temporary
    files of writes a kill interrupted, and its directory once empty)."""
    path = Path(path)
    token = _RESUME.set((path, key))
    try:
        yield
        distributed.barrier()                  # under torchrun: process 0 has written its last save
        if distributed.is_main():
            path.unlink(missing_ok=True)
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                stale.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()            # only if empty
    finally:
        _RESUME.reset(token)


class _Loop:
    """The state one training loop checkpoints each epoch (when :func:`resumable` is active)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator):
        self.parts = {"model": model, "optimizer": opt, "scheduler": sched}
        self.gen = gen
        self.point = _RESUME.get()

    def restore(self) -> tuple[int, list[dict[str, Any]]]:
        """``(last complete epoch, history rows)``: ``(0, [])`` when there is nothing to resume."""
        if self.point is None or not self.point[0].is_file():
            return 0, []
        path, key = self.point
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:                      # a damaged resume file is only a cache: start over
            return 0, []
        if not isinstance(ckpt, dict) or ckpt.get("key") != key:
            return 0, []
        for name, part in self.parts.items():
            part.load_state_dict(ckpt[name])
        self.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"][distributed.rank()])      # each process's dropout stream
        cuda_rng = ckpt.get("cuda_rng") or []        # dropout on CUDA draws from the CUDA generators
        if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        if distributed.is_main():
            print(f"train: resuming after epoch {ckpt['epoch']} from {path}", file=sys.stderr)
        return int(ckpt["epoch"]), list(ckpt["rows"])

    def save(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        if self.point is None:
            return
        torch_rng = distributed.all_gather(torch.get_rng_state())
        if not distributed.is_main():
            return
        path, key = self.point
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"key": key, "epoch": epoch, "rows": rows, "generator": self.gen.get_state(),
                    "torch_rng": torch_rng,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                    **{name: part.state_dict() for name, part in self.parts.items()}}, tmp)
        os.replace(tmp, path)                  # a kill mid-write leaves the previous epoch's file


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], *, batch_size: int = 64,
            forward: Forward = _plain) -> torch.Tensor:
    """Logits ``[N, C]`` (whatever ``forward`` returns per batch) in eval mode (the
    model's mode is restored). ``x`` is a tensor or a tuple of tensors sliced together
    (``forward(model, (x0[i:j], x1[i:j], ...))``); each batch is moved to the model's
    device, and the logits come back on the device of ``x``."""
    was_training = model.training
    model.eval()
    first = x[0] if isinstance(x, tuple) else x
    device = model_device(model)
    try:
        return torch.cat([forward(model, to_device(take_rows(x, slice(i, i + batch_size)), device)).to(first.device)
                          for i in range(0, len(first), batch_size)])
    finally:
        model.train(was_training)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1).numpy()
    return {
        "loss": float(nn.functional.cross_entropy(logits, y)),
        "accuracy": float(accuracy_score(y.numpy(), pred)),
        "macro_f1": float(f1_score(y.numpy(), pred, average="macro")),
    }


def make_schedule(opt: torch.optim.Optimizer, cfg: Train, steps_per_epoch: int):
    """Per-step learning-rate schedule: constant, or one-cycle (warm-up then cosine)."""
    if cfg.schedule == "onecycle":
        # each parameter group peaks at its own learning rate (e.g. a faster fusion)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=cfg.epochs * steps_per_epoch,
                                                   pct_start=cfg.warmup)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def fit_classifier(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                   x_test: torch.Tensor, y_test: torch.Tensor, cfg: Train, *,
                   forward: Forward = _plain, param_groups: list[dict] | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Train with AdamW and cross-entropy; returns the per-epoch history.

    ``param_groups``: AdamW parameter groups with their own ``lr``/``weight_decay``
    (default: all parameters at ``cfg.lr`` and ``cfg.weight_decay``).

    Columns: ``epoch, train_loss, train_accuracy, test_loss, test_accuracy,
    test_macro_f1``. Shuffling uses its own generator seeded with ``cfg.seed``, so a
    run is reproducible on CPU.
    """
    torch.manual_seed(cfg.seed + distributed.rank())      # dropout: one stream per process
    gen = torch.Generator().manual_seed(cfg.seed)          # the same batches in every process
    device = model_device(model)
    net, world = _replica(model)
    opt = torch.optim.AdamW(param_groups or model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_schedule(opt, cfg, steps_per_epoch=-(-len(x_train) // cfg.batch_size))
    loop = _Loop(model, opt, sched, gen)
    done, rows = loop.restore()
    _report(rows)
    for epoch in tqdm(range(done + 1, cfg.epochs + 1), desc="train", disable=not (progress and distributed.is_main())):
        started = time.monotonic()
        model.train()
        losses, correct = [], 0
        for idx in torch.randperm(len(x_train), generator=gen).split(cfg.batch_size):
            mine, weight = _my_share(idx, world)
            yb = y_train[mine].to(device)
            logits = forward(net, x_train[mine].to(device))
            if world == 1:
                loss = nn.functional.cross_entropy(logits, yb)
            else:                  # this process's share of the global batch's mean; DDP averages over N
                loss = nn.functional.cross_entropy(logits, yb, reduction="sum") * (weight * world / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item() * len(idx) / world)
            correct += int((logits.argmax(-1) == yb).sum()) * weight
        loss_sum, correct = distributed.all_reduce_(torch.tensor([float(np.sum(losses)), correct],
                                                                 dtype=torch.float64)).tolist()
        test = classification_metrics(_predict_sharded(model, x_test, forward), y_test)
        rows.append({"epoch": epoch, "train_loss": float(loss_sum / len(x_train)),
                     "train_accuracy": int(correct) / len(x_train),
                     **{f"test_{k}": v for k, v in test.items()}})
        loop.save(epoch, rows)
        _pace(started)
        _report(rows[-1:])
    import pandas as pd

    return pd.DataFrame(rows)


def _replica(model: nn.Module) -> tuple[Any, int]:
    """``(what the loop calls, number of processes)``: the model itself, or under
    torchrun a DDP replica (:class:`attnlab.distributed.Replica`)."""
    world = distributed.world_size()
    return (distributed.Replica(model) if world > 1 else model), world


def _my_share(idx: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """This process's samples of a global batch and their weight (1). A process left
    without a sample (a last batch smaller than N) runs one sample with weight 0, as
    every process must take part in each step's gradient reduction."""
    if world == 1:
        return idx, 1
    mine = idx[distributed.shard()]
    return (mine, 1) if len(mine) else (idx[:1], 0)


def _predict_sharded(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], forward: Forward) -> torch.Tensor:
    """:func:`predict` of every row, each process computing its shard (:func:`attnlab.distributed.shard`)."""
    if not distributed.active():
        return predict(model, x, forward=forward)
    first = x[0] if isinstance(x, tuple) else x
    return distributed.gather_rows(predict(model, take_rows(x, distributed.shard()), forward=forward), len(first))


@torch.no_grad()
def lm_evaluate(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 128,
                target_mask: torch.Tensor | None = None, sharded: bool = False) -> dict[str, float]:
    """Token-weighted next-token loss, perplexity and accuracy over a dataset (eval mode).
    ``sharded``: under torchrun each process scores its shard and the sums are combined."""
    from attnlab.models.causal import lm_metrics

    if sharded and distributed.active():
        rows = distributed.shard()
        tokens, mask = tokens[rows], mask[rows]
        target_mask = None if target_mask is None else target_mask[rows]
    else:
        sharded = False
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    try:
        for i in range(0, len(tokens), batch_size):
            t, m = tokens[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)
            tm = None if target_mask is None else target_mask[i:i + batch_size].to(device)
            if tm is not None and not bool((tm[:, 1:] & m[:, 1:] & m[:, :-1]).any()):
                continue
            got = lm_metrics(model(t, m), t, m, target_mask=tm)
            total["loss"] += got["loss"] * got["n_tokens"]
            total["accuracy"] += got["accuracy"] * got["n_tokens"]
            total["n"] += got["n_tokens"]
    finally:
        model.train(was_training)
    if sharded:
        total = dict(zip(total, distributed.all_reduce_(torch.tensor(list(total.values()), dtype=torch.float64)).tolist()))
    n = max(total["n"], 1)
    loss = total["loss"] / n
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "accuracy": total["accuracy"] / n}


def fit_lm(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
           cfg: Train, *, test_target_mask: torch.Tensor | None = None, progress: bool = False) -> pd.DataFrame:
    """Next-token training with AdamW; returns the per-epoch history.

    Columns: ``epoch, train_loss, train_accuracy, test_loss, test_perplexity,
    test_accuracy`` and, given ``test_target_mask`` (e.g. the planted rule
    positions), ``test_target_accuracy``.
    """
    from attnlab.models.causal import lm_loss, lm_metrics

    torch.manual_seed(cfg.seed + distributed.rank())      # dropout: one stream per process
    gen = torch.Generator().manual_seed(cfg.seed)          # the same batches in every process
    (x_tr, m_tr), (x_te, m_te) = train, test
    device = model_device(model)
    net, world = _replica(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_schedule(opt, cfg, steps_per_epoch=-(-len(x_tr) // cfg.batch_size))
    loop = _Loop(model, opt, sched, gen)
    done, rows = loop.restore()
    _report(rows)
    for epoch in tqdm(range(done + 1, cfg.epochs + 1), desc="train", disable=not (progress and distributed.is_main())):
        started = time.monotonic()
        model.train()
        seen = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        for idx in torch.randperm(len(x_tr), generator=gen).split(cfg.batch_size):
            mine, weight = _my_share(idx, world)
            tokens, mask = x_tr[mine].to(device), m_tr[mine].to(device)
            logits = net(tokens, mask)
            if world == 1:
                loss = lm_loss(logits, tokens, mask)
            else:                  # this process's share of the global batch's token mean; DDP averages over N
                m = m_tr[idx].bool()
                loss = lm_loss(logits, tokens, mask, reduction="sum") * (weight * world / int((m[:, 1:] & m[:, :-1]).sum()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            got = lm_metrics(logits.detach(), tokens, mask)
            seen["loss"] += got["loss"] * got["n_tokens"] * weight
            seen["accuracy"] += got["accuracy"] * got["n_tokens"] * weight
            seen["n"] += got["n_tokens"] * weight
        seen = dict(zip(seen, distributed.all_reduce_(torch.tensor(list(seen.values()), dtype=torch.float64)).tolist()))
        row = {"epoch": epoch, "train_loss": seen["loss"] / seen["n"], "train_accuracy": seen["accuracy"] / seen["n"],
               **{f"test_{k}": v for k, v in lm_evaluate(model, x_te, m_te, sharded=True).items()}}
        if test_target_mask is not None:
            row["test_target_accuracy"] = lm_evaluate(model, x_te, m_te, target_mask=test_target_mask,
                                                      sharded=True)["accuracy"]
        rows.append(row)
        loop.save(epoch, rows)
        _pace(started)
        _report(rows[-1:])
    import pandas as pd

    return pd.DataFrame(rows)
