"""Where the pipeline's files live: ``data/<experiment>/<stage>/<file>``.

The one place that knows the stage layout; stages, the report and tracking ask it.

``lay = Layout(Path("data/motion"))``; ``lay.model`` is ``data/motion/train/model.pt``,
``lay.dir("explain")`` the explain stage's directory. While a stage runs it writes
into a temporary directory (renamed into place on success):
``Layout(root, writing=("explain", tmp))`` resolves that stage's files inside ``tmp``.
"""
from __future__ import annotations

from pathlib import Path

#: The stages, in pipeline order (``dvc.yaml`` runs each for every experiment).
STAGES = ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report", "track")

#: Every file a stage writes that another stage, the report or tracking reads: name -> (stage, path).
FILES: dict[str, tuple[str, str]] = {
    "dataset": ("prepare", "dataset.npz"),               # x/y or tokens/mask, train and test splits
    "meta": ("prepare", "meta.json"),                    # classes, vocabulary, item counts, source
    "model": ("train", "model.pt"),                      # checkpoint: factory, kwargs, state dict
    "train_metrics": ("train", "metrics.json"),
    "history": ("train", "history.csv"),                 # one row per epoch
    "attention": ("extract", "attention.h5"),            # every entry's [N, H, Lq, Lk], float16
    "predictions": ("extract", "predictions.npz"),       # y, pred, prob (classifiers)
    "stream_weights": ("extract", "weights.npz"),        # a fusion's per-sample stream weights
    "aggregate_summary": ("aggregate", "summary.json"),  # which aggregations were made
    "importance": ("explain", "importance.npz"),         # per method [M, n_items], target, the kind's arrays
    "explain_figures": ("explain", "figures"),
    "metrics": ("evaluate", "metrics.json"),
    "results": ("evaluate", "results"),                  # heads.csv, figures/
    "report": ("report", "report.html"),
    "run": ("track", "run.json"),
}


class Layout:
    """Paths of one experiment's stage outputs under ``root`` (``data/<experiment>``)."""

    def __init__(self, root: str | Path, writing: tuple[str, Path] | None = None):
        self.root = Path(root)
        if writing is not None and writing[0] not in STAGES:
            raise ValueError(f"unknown stage {writing[0]!r}; stages: {', '.join(STAGES)}")
        self.writing = writing

    def dir(self, stage: str) -> Path:
        """The directory of ``stage`` (the temporary one while that stage is being written)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if self.writing is not None and self.writing[0] == stage:
            return Path(self.writing[1])
        return self.root / stage

    def resume(self, stage: str) -> Path:
        """The checkpoint ``stage`` resumes from after a kill: beside the stage directories
        (not a DVC output, so the next run finds it), removed when the stage succeeds."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.root / ".resume" / f"{stage}.pt"

    def timing(self, stage: str) -> Path:
        """When ``stage`` last ran (wall-clock start and end, and a digest of what it
        wrote), recorded by the stage runner beside the stage directories: not a DVC
        output and not hashed, so identical runs keep identical ``dvc.lock`` hashes; the
        track stage gives its MLflow run the stages' real start and end."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.root / ".timings" / f"{stage}.json"

    def vocab(self, view: str, *, kind: str = "matrices") -> Path:
        """The aggregate stage's files of one aggregation ``view`` (e.g. ``layer0``):
        ``matrices`` (head mean, ``.npz``), ``head_matrices``, ``pairs`` (long table),
        ``top_pairs``, ``top_pairs_per_head``."""
        names = {"matrices": f"vocab_{view}.npz", "head_matrices": f"vocab_{view}_heads.npz",
                 "pairs": f"pairs_{view}.csv.gz", "top_pairs": f"top_pairs_{view}.csv",
                 "top_pairs_per_head": f"top_pairs_{view}_per_head.csv"}
        if kind not in names:
            raise ValueError(f"kind={kind!r}; accepted: {', '.join(names)}")
        return self.dir("aggregate") / names[kind]

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_") or name not in FILES:
            raise AttributeError(f"Layout has no file {name!r}; files: {', '.join(FILES)}")
        stage, path = FILES[name]
        return self.dir(stage) / path

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r})"


class DirectoryLayout(Layout):
    """Every stage's files in one directory ``root`` (``attnlab explain --out DIR``): the
    pipeline's stage functions run on it unchanged, and write ``DIR/attention.h5``,
    ``DIR/importance.npz``, ``DIR/metrics.json``, ``DIR/results/heads.csv``... (the same
    file names as under ``data/<experiment>/<stage>/``, without the stage directories)."""

    #: Files whose stage-directory names would collide in one directory.
    RENAMED = {"explain_figures": "examples"}        # the report's own figures are in figures/

    def __init__(self, root: str | Path):
        super().__init__(root)

    def dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.root

    def __getattr__(self, name: str) -> Path:
        if name in self.RENAMED:
            return self.root / self.RENAMED[name]
        return super().__getattr__(name)

    def __repr__(self) -> str:
        return f"DirectoryLayout({str(self.root)!r})"
