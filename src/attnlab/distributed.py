"""Several processes of one stage under ``torchrun`` (``torch.distributed``).

``train``, ``extract`` and ``aggregate`` run unchanged as ``torchrun --nproc_per_node N
stages/<stage>.py <experiment>``; ``NPROC=N make run`` (``ATTNLAB_NPROC``) makes the
stage scripts start themselves that way (:func:`relaunch`), with no edit to ``dvc.yaml``
or the params. The process group is gloo on the CPU and NCCL on CUDA (one device per
process: ``cuda:LOCAL_RANK``).

How the work is shared, so that N processes compute what one does:

* **Training** (DDP): every process draws the same permutation of the training set
  (one seeded generator, as in one process), and each global batch of
  ``train.batch_size`` samples is sharded the way ``DistributedSampler`` shards a dataset
  (process ``r`` takes every N-th sample from the ``r``-th, :func:`shard`) but without
  its padding. Each process's loss is its share of the global batch's mean (the sum of
  its samples' losses over the global count, times N, as DDP averages the gradients),
  so a step's gradient is the one of a single process on the whole batch: without
  dropout the weights agree to float rounding. Dropout draws from one stream per
  process (seed + rank).
* **Extraction**: process ``r`` records a contiguous block of the test samples into a
  shard file; process 0 merges the shards into one attention file in sample order
  (compressed chunks copied as they are).
* **Aggregation**: each process aggregates a contiguous block of the stored attention
  and the ``VocabAttention`` tables are summed over the processes by all-reduce
  (:meth:`~attnlab.aggregate.VocabAttention.all_reduce`, the semantics of ``merge``).

Only process 0 writes outputs, timings and progress bars; MLflow is written by the
``track`` stage, which runs once.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The stages that can run in several processes.
STAGES = ("train", "extract", "aggregate")


def _dist() -> Any:
    """``torch.distributed``, imported when first needed: a stage that never joins a
    process group (report, or any stage without torchrun) need not import torch for it."""
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside a process group of more than one process (never before torch.distributed
    is imported: a group cannot exist yet)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def backend() -> str | None:
    return str(_dist().get_backend()) if active() else None


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process started by ``torchrun`` (it sets ``LOCAL_RANK``/``WORLD_SIZE``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def requested_processes() -> int:
    """``ATTNLAB_NPROC`` (``NPROC=N make run``): processes per stage, default 1."""
    value = os.environ.get("ATTNLAB_NPROC", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ATTNLAB_NPROC={value!r}: expected a positive integer (processes per stage)")
    return int(value)


def relaunch(stage: str, argv: list[str]) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N`` of the same
    stage script when ``ATTNLAB_NPROC`` asks for N > 1 processes and ``stage`` can use
    them (and it is not already under torchrun). ``--standalone`` picks a free port, so
    parallel sweeps do not collide."""
    n = requested_processes()
    if n == 1 or stage not in STAGES or launched():
        return
    # the stage's threads (ATTNLAB_NUM_THREADS, default one per core) shared out among
    # the processes, so N processes do not oversubscribe the cores (nor a sweep's workers)
    threads = int(os.environ.get("ATTNLAB_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["ATTNLAB_NUM_THREADS"] = str(max(1, threads // n))
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["ATTNLAB_NUM_THREADS"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={n}", *argv])


def local_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under torchrun for a CUDA ``device``."""
    if launched() and device.type == "cuda":
        import torch

        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init(device: torch.device) -> None:
    """Join the process group when started by ``torchrun`` with more than one process
    (nothing otherwise): gloo for a CPU ``device``, NCCL for CUDA. A SIGTERM (torchrun
    stopping the others when one process fails) then raises ``SystemExit``, so the
    temporary outputs are removed on the way out."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return
    import torch

    dist = _dist()
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def shutdown() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


def broadcast(obj: Any) -> Any:
    """Process 0's ``obj`` on every process."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place."""
    if active():
        dist = _dist()
        shared = tensor.cuda() if dist.get_backend() == "nccl" else tensor     # NCCL reduces CUDA tensors only
        dist.all_reduce(shared)
        if shared is not tensor:
            tensor.copy_(shared)
    return tensor


# --------------------------------------------------------------------------- sharding
def shard() -> slice:
    """This process's samples of a batch or dataset: every N-th from the ``rank``-th
    (``DistributedSampler(shuffle=False)``'s order, without its padding)."""
    return slice(rank(), None, world_size())


def block(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Process ``r``'s (default: this one's) contiguous block ``[start, stop)`` of ``n``
    samples among ``world`` processes: sizes differ by at most one, the first ``n % N``
    processes take one more."""
    r = rank() if r is None else r
    size, extra = divmod(n, world_size() if world is None else world)
    start = r * size + min(r, extra)
    return start, start + size + (r < extra)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of a tensor computed in shards (:func:`shard`: process ``r`` holds
    rows ``r, r + N, ...``), in their order, on every process."""
    if not active():
        return local
    import torch

    dist = _dist()
    w = world_size()
    rows = -(-n // w)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[:len(local)] = local
    collective = padded.cuda() if dist.get_backend() == "nccl" else padded
    parts = [torch.empty_like(collective) for _ in range(w)]
    dist.all_gather(parts, collective)
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::w] = part[:len(range(r, n, w))].to(local.device)
    return out


class Replica:
    """A DDP-wrapped model that still reads like the model: calling it runs DDP's
    forward (which synchronises the gradients in backward); every attribute is the
    wrapped model's (an experiment's ``forward(model, batch)`` may use ``model.unpack``)."""

    def __init__(self, model: torch.nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # static_graph: the models' graphs do not change between steps, and parameters
        # a forward does not use (e.g. a [CLS] token under mean pooling) are allowed
        self.ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                           static_graph=True)

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.ddp.module, name)
