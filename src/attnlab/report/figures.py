"""Figures shared by the reports. Each function returns a matplotlib Figure."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def pick_examples(y: np.ndarray, k: int) -> list[int]:
    """Up to ``k`` sample indices, cycling over classes so each class is shown."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < min(k, len(y)):
        for rows in by_class:
            if rows and len(picked) < k:
                picked.append(int(rows.pop(0)))
    return sorted(picked)


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Loss and accuracy per epoch, train vs test."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.2))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], style, label=split)
        ax_acc.plot(history["epoch"], history[f"{split}_accuracy"], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_loss.legend()
    fig.tight_layout()
    return fig


def head_grid(attn_lhqk: np.ndarray, layer_names: Sequence[str], title: str, item: str = "item") -> plt.Figure:
    """Per-layer x per-head attention maps ``[L, H, Lq, Lk]`` of one sample (rows: layers),
    one colour scale with its bar. Panels shrink so the figure stays at most 16 inches
    wide (a 12-head model's row fits); see :func:`head_grid_pages` for many layers."""
    n_layers, n_heads = attn_lhqk.shape[:2]
    panel = min(2.2, 15.0 / n_heads)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(panel * n_heads + 1.0, panel * n_layers + 0.6),
                             squeeze=False)
    vmax = float(np.nanquantile(attn_lhqk, 0.995)) or None
    image = None
    for l in range(n_layers):
        for h in range(n_heads):
            ax = axes[l, h]
            image = ax.imshow(attn_lhqk[l, h], cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if l == n_layers - 1:
                ax.set_xlabel(f"key {item}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"{layer_names[l]}\nquery {item}", fontsize=8)
            if l == 0:
                ax.set_title(f"head {h}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("attention probability" + (" (clipped at the 99.5th percentile)" if vmax else ""), fontsize=8)
    return fig


def head_grid_pages(attn_lhqk: np.ndarray, layer_names: Sequence[str], title: str, item: str = "item",
                    layers_per_page: int = 6) -> list[plt.Figure]:
    """:func:`head_grid` in pages of at most ``layers_per_page`` layers, so a deep model's
    grid stays legible (each page titled with its layers)."""
    n_layers = attn_lhqk.shape[0]
    if n_layers <= layers_per_page:
        return [head_grid(attn_lhqk, layer_names, title, item)]
    return [head_grid(attn_lhqk[lo:lo + layers_per_page], layer_names[lo:lo + layers_per_page],
                      f"{title} (layers {lo + 1}-{min(lo + layers_per_page, n_layers)} of {n_layers})", item)
            for lo in range(0, n_layers, layers_per_page)]


def _share_bar(fig: plt.Figure, axes, label: str) -> None:
    """One colour bar for images drawn with magma on [0, 1]."""
    mappable = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="magma")
    bar = fig.colorbar(mappable, ax=list(np.ravel(axes)), fraction=0.025, pad=0.01)
    bar.set_label(label, fontsize=8)


def importance_by_class(importance: dict[str, np.ndarray], y: np.ndarray, classes: Sequence[str],
                        item: str = "item") -> plt.Figure:
    """Mean (± one standard deviation) importance per item position: one row per
    method, one column per class, each row on one y scale (the classes of a method
    compare at a glance); the dotted line is uniform importance."""
    methods = list(importance)
    # not sharex=True: with methods x classes axes sharing one x axis, every artist added
    # re-autoscales all of them (13 x 10 axes: 10 s); every method has the same items anyway.
    # Tick labels only on the outer axes and fixed spacing instead of tight_layout, which
    # draws the 130 axes once more to measure them (frames: 6.8 s -> 5.2 s for this figure).
    fig, axes = plt.subplots(len(methods), len(classes), figsize=(2.6 * len(classes), 1.9 * len(methods)),
                             squeeze=False, sharey="row")
    fig.subplots_adjust(wspace=0.06, hspace=0.08)
    palette = sns.color_palette()
    for r, method in enumerate(methods):
        imp = np.asarray(importance[method])
        t = np.arange(imp.shape[1])
        for c, ax in enumerate(axes[r]):
            rows = imp[y == c]
            if len(rows):
                mean, std = rows.mean(0), rows.std(0)
                ax.plot(t, mean, color=palette[c % 10], lw=1)
                ax.fill_between(t, mean - std, mean + std, alpha=0.25, color=palette[c % 10])
            ax.axhline(1.0 / imp.shape[1], color="grey", lw=0.8, ls=":")
            ax.set_xlim(-0.5, imp.shape[1] - 0.5)
            if r == 0:
                ax.set_title(f"{classes[c]} (n={len(rows)})", fontsize=9)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
            else:
                ax.tick_params(labelleft=False)
            if r == len(methods) - 1:
                ax.set_xlabel(item)
            else:
                ax.tick_params(labelbottom=False)
    return fig


def importance_bands(importance: dict[str, np.ndarray], title: str, item: str = "item",
                     x_tf: np.ndarray | None = None, channels: Sequence[str] = (),
                     evidence: np.ndarray | None = None) -> plt.Figure:
    """One sample's per-item importance of each method as heat bands (one row per
    method, each scaled to its own maximum), under the input sequence if given;
    evidence items, when known, are marked with ticks on the bottom axis."""
    methods = list(importance)
    n_rows = len(methods) + (x_tf is not None)
    ratios = ([3] if x_tf is not None else []) + [0.6] * len(methods)
    fig, axes = plt.subplots(n_rows, 1, figsize=(9, 0.6 * len(methods) + (2.4 if x_tf is not None else 0.8)),
                             sharex=True, gridspec_kw={"height_ratios": ratios}, squeeze=False)
    axes = list(axes[:, 0])
    if x_tf is not None:
        ax = axes.pop(0)
        for f in range(x_tf.shape[1]):
            ax.plot(x_tf[:, f], lw=0.9, label=channels[f] if f < len(channels) else str(f))
        ax.legend(fontsize=7, ncol=max(1, len(channels)), loc="upper right")
    n = len(next(iter(importance.values())))
    for ax, method in zip(axes, methods):
        imp = np.asarray(importance[method], dtype=float)
        ax.imshow(imp[None, :] / max(imp.max(), 1e-12), aspect="auto", cmap="magma", vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, n - 0.5, 0, 1))
        ax.set_yticks([0.5], [method], fontsize=8)
    if evidence is not None:
        for t in np.flatnonzero(evidence):
            axes[-1].axvline(t, ymin=-0.35, ymax=0, color="deepskyblue", lw=2, clip_on=False)
    axes[-1].set_xlabel(item)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    _share_bar(fig, axes, "importance / method max")
    return fig


def faithfulness_curves(curves: dict[str, pd.DataFrame]) -> plt.Figure:
    """Deletion and insertion curves (mean probability of the explained class) per method."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.4), squeeze=False)
    for ax, (mode, frame) in zip(axes[0], curves.items()):
        for method in frame.columns.drop("fraction"):
            style = dict(color="black", ls="--", lw=1.5) if method == "random" else dict(lw=1.2)
            ax.plot(frame["fraction"], frame[method], label=method, **style)
        verb = "removed" if mode == "deletion" else "inserted"
        ax.set(title=f"{mode} (area: {'lower' if mode == 'deletion' else 'higher'} is better)",
               xlabel=f"fraction of items {verb}, most important first", ylabel="p(explained class)",
               ylim=(0, 1.02))
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def sanity_curves(sanity: dict) -> plt.Figure:
    """The randomisation test: mean |Spearman rho| between trained and randomised
    importance per method, cascading from the output back (left) and one block at a
    time (right, when run); the dashed line is the pass threshold."""
    blocks = sanity["blocks"]
    two = bool(sanity["independent"])
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    depths = list(range(len(blocks) + 1))
    labels = ["trained"] + [f"+{b}" for b in reversed(blocks)]
    for method, curve in sanity["cascading"].items():
        ax.plot(depths, [1.0] + [curve[str(d)] for d in depths[1:]], marker="o", label=method)
    ax.axhline(sanity["threshold"], ls="--", color="grey", lw=1)
    ax.set_xticks(depths, labels, rotation=30, ha="right", fontsize=7)
    ax.set(xlabel="blocks re-initialised (cascading, output first)", ylabel="mean |Spearman rho|",
           ylim=(-0.02, 1.02), title="cascading randomisation")
    ax.legend(fontsize=7)
    if two:
        ax = axes[0, 1]
        frame = pd.DataFrame(sanity["independent"]).loc[blocks]       # rows: blocks, columns: methods
        frame.plot.bar(ax=ax, rot=30, fontsize=7, legend=False)
        ax.axhline(sanity["threshold"], ls="--", color="grey", lw=1)
        ax.set(xlabel="block re-initialised alone", ylabel="mean |Spearman rho|", ylim=(0, 1.02),
               title="independent randomisation")
        ax.set_xticklabels(ax.get_xticklabels(), ha="right")
    fig.tight_layout()
    return fig


def head_heatmaps(heads: pd.DataFrame, columns: Sequence[str]) -> plt.Figure:
    """One layers x heads heatmap per diagnostic (rows: recorded attention entries)."""
    fig, axes = plt.subplots(1, len(columns), figsize=(3.0 * len(columns) + 1, 0.45 * heads["entry"].nunique() + 1.6),
                             squeeze=False)
    labels = heads.drop_duplicates("entry").set_index("entry")["module"]
    for ax, column in zip(axes[0], columns):
        grid = heads.pivot(index="entry", columns="head", values=column)
        sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", cmap="rocket_r" if column != "entropy" else "mako",
                    cbar=False, annot_kws={"fontsize": 7}, yticklabels=[labels[i] for i in grid.index])
        ax.set(title=column, xlabel="head", ylabel="")
        ax.tick_params(axis="y", labelsize=7)
        if ax is not axes[0, 0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    return fig


def vocab_clustermap(agg, itos: Sequence[str], n_tokens: int, *, min_count: int = 1,
                     exclude: str | Sequence[int | str] | None = "special"):
    """Clustered heatmap of log2 lift among the ``n_tokens`` most frequent tokens
    (query tokens in rows, key tokens in columns); pairs seen fewer than
    ``min_count`` times are blank. ``exclude``: tokens left out (``"special"``: names
    like ``<pad>``, ``<bos>``, ``[CLS]``, ``[SEP]``; or ids / token strings; ``None``:
    none). Reads only the ``n_tokens x n_tokens`` block of ``agg`` (a
    :class:`~attnlab.aggregate.VocabAttention`), so 50k vocabularies work.
    Returns the matplotlib Figure."""
    freq = agg.token_pair_counts()                                  # [V]: pairs each token takes part in
    dropped = set()
    if exclude == "special":
        from attnlab.aggregate import special_token_ids
        dropped = set(special_token_ids(itos))
    elif exclude is not None:
        lookup = {name: i for i, name in enumerate(itos)}
        unknown = [t for t in exclude if isinstance(t, str) and t not in lookup]
        if unknown:
            raise ValueError(f"exclude: token {unknown[0]!r} is not in the vocabulary")
        dropped = {lookup[t] if isinstance(t, str) else int(t) for t in exclude}
    keep = [int(i) for i in np.argsort(-freq, kind="stable") if freq[i] > 0 and int(i) not in dropped][:n_tokens]
    count = agg.submatrix("count", keep)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.log2(agg.submatrix("lift", keep))
    lift[(count < min_count) | ~np.isfinite(lift)] = np.nan
    frame = pd.DataFrame(lift, index=[itos[i] for i in keep], columns=[itos[i] for i in keep])
    filled = frame.fillna(0.0)
    size = max(5.0, 0.22 * len(keep) + 2)
    grid = sns.clustermap(filled, mask=frame.isna(), cmap="vlag", center=0, figsize=(size, size),
                          xticklabels=True, yticklabels=True, cbar_kws={"label": "log2 lift"},
                          method="average", metric="euclidean")
    grid.ax_heatmap.set(xlabel="key token", ylabel="query token")
    grid.ax_heatmap.tick_params(labelsize=7)
    return grid.figure


def frame_strip(frames_thw: np.ndarray, importance: dict[str, np.ndarray], evidence_t: np.ndarray,
                title: str) -> plt.Figure:
    """A clip as a strip of frames (evidence frames framed in blue) with each method's
    per-frame importance as a heat band beneath (each scaled to its maximum); the
    top-ranked frames of each method are marked with a white dot."""
    t_len = frames_thw.shape[0]
    methods = list(importance)
    fig, axes = plt.subplots(1 + len(methods), t_len, figsize=(0.62 * t_len + 1.2, 0.72 * (1 + len(methods)) + 0.5),
                             gridspec_kw={"height_ratios": [2.2] + [1] * len(methods)}, squeeze=False)
    n_key = max(int(evidence_t.sum()), 1)
    for t in range(t_len):
        ax = axes[0, t]
        ax.imshow(frames_thw[t], cmap="gray")
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set(color="deepskyblue" if evidence_t[t] else "none", lw=3)
    for r, method in enumerate(methods, start=1):
        imp = np.asarray(importance[method], dtype=float)
        top = set(np.argsort(-imp, kind="stable")[:n_key])
        for t in range(t_len):
            ax = axes[r, t]
            ax.imshow([[imp[t] / max(imp.max(), 1e-12)]], cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if t in top:
                ax.plot(0, 0, "o", color="white", ms=4)
        axes[r, 0].set_ylabel(method, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title + "  (blue: evidence frames; dot: a method's top frames)", fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.08, right=0.9)
    _share_bar(fig, axes[1:], "importance / method max")
    return fig


def video_overlay(frames_thw: np.ndarray, maps: dict[str, np.ndarray], evidence_fgg: np.ndarray,
                  title: str) -> plt.Figure:
    """Frames (top row, evidence patches outlined) and each method's frames x patches
    importance overlaid on them (one row per method, shared scale per method)."""
    f_len, grid = evidence_fgg.shape[0], evidence_fgg.shape[1]
    size = frames_thw.shape[-1]
    cell = size / grid
    methods = list(maps)
    fig, axes = plt.subplots(1 + len(methods), f_len, figsize=(1.3 * f_len + 1.2, 1.3 * (1 + len(methods))),
                             squeeze=False)
    for t in range(f_len):
        ax = axes[0, t]
        ax.imshow(frames_thw[t], cmap="gray")
        for gy, gx in zip(*np.nonzero(evidence_fgg[t])):
            ax.add_patch(plt.Rectangle((gx * cell - 0.5, gy * cell - 0.5), cell, cell, fill=False,
                                       ec="deepskyblue", lw=1))
        ax.set_title(f"frame {t}", fontsize=7)
    for r, method in enumerate(methods, start=1):
        vmax = max(float(maps[method].max()), 1e-12)
        for t in range(f_len):
            ax = axes[r, t]
            ax.imshow(frames_thw[t], cmap="gray")
            ax.imshow(maps[method][t] / vmax, cmap="magma", alpha=0.6, vmin=0, vmax=1,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        axes[r, 0].set_ylabel(method, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title + "  (blue: evidence patches)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    _share_bar(fig, axes[1:], "importance / method max")
    return fig


def stream_weights_by_class(weights_bs: np.ndarray, y: np.ndarray, classes: Sequence[str],
                            streams: Sequence[str]) -> plt.Figure:
    """Distribution of each stream's fusion weight per class (box plots; dotted: equal weights)."""
    frame = pd.DataFrame({"class": np.asarray(classes)[y].repeat(len(streams)),
                          "stream": np.tile(list(streams), len(y)), "weight": weights_bs.reshape(-1)})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(classes)), 3.2))
    sns.boxplot(frame, x="class", y="weight", hue="stream", order=list(classes), ax=ax, fliersize=1.5)
    ax.axhline(1.0 / len(streams), color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("fusion weight of each stream, per class")
    fig.tight_layout()
    return fig


def stream_weights_by_corruption(weights_bs: np.ndarray, corrupted_bs: np.ndarray,
                                 streams: Sequence[str]) -> plt.Figure:
    """Per-sample weight of each stream, split by which stream of the sample was corrupted."""
    state = np.array(["none corrupted"] * len(weights_bs), dtype=object)
    for i, s in enumerate(streams):
        state[corrupted_bs[:, i]] = f"{s} corrupted"
    frame = pd.DataFrame({"sample": np.repeat(state, len(streams)),
                          "stream": np.tile(list(streams), len(weights_bs)), "weight": weights_bs.reshape(-1)})
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    outside = np.random.get_state()            # seaborn jitters with numpy's global generator:
    np.random.seed(0)                          # seed it here, so the figure (and report) is reproducible
    try:
        sns.stripplot(frame, x="sample", y="weight", hue="stream", dodge=True, size=2, alpha=0.5, ax=ax,
                      order=sorted(set(state)))
    finally:
        np.random.set_state(outside)
    ax.axhline(1.0 / len(streams), color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("per-sample fusion weights against corruption")
    fig.tight_layout()
    return fig



def method_ranking(experiments: dict[str, dict]) -> plt.Figure:
    """Every experiment's methods at a glance: one row per experiment, its deletion AUC
    (lower is better) and, where the data have ground truth, its evidence AUROC (higher
    is better), each method a point with its 95% bootstrap interval, best first; the
    random baseline is a dashed line. ``experiments``: name -> evaluate/metrics.json."""
    with_truth = any("auroc" in m.get("evidence", {}) for m in experiments.values())
    columns = 2 if with_truth else 1
    heights = [0.9 + 0.22 * len(m["faithfulness"]["deletion_auc"]) for m in experiments.values()]
    fig, axes = plt.subplots(len(experiments), columns, figsize=(5.4 * columns, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for row, (name, metrics) in zip(axes, experiments.items()):
        panels = [("deletion AUC (lower is better)", metrics["faithfulness"]["deletion_auc"],
                   metrics["faithfulness"].get("deletion_auc_ci", {}), False)]
        if "auroc" in metrics.get("evidence", {}):
            panels.append(("evidence AUROC (higher is better)", metrics["evidence"]["auroc"],
                           metrics.get("evidence_ci", {}).get("auroc", {}), True))
        for ax, (title, values, intervals, higher) in zip(row, panels):
            methods = sorted((m for m in values if m != "random"), key=lambda m: values[m], reverse=higher)
            y = np.arange(len(methods))[::-1]
            mid = np.array([values[m] for m in methods])
            lo = np.array([intervals.get(m, {}).get("lo", values[m]) for m in methods])
            hi = np.array([intervals.get(m, {}).get("hi", values[m]) for m in methods])
            ax.errorbar(mid, y, xerr=[mid - lo, hi - mid], fmt="o", ms=4, capsize=3, color="#1f5f99")
            if "random" in values:
                ax.axvline(values["random"], color="black", ls="--", lw=1)
            ax.set_yticks(y, methods, fontsize=8)
            ax.set_ylim(-0.6, len(methods) - 0.4)
            ax.set_title(f"{name}: {title}" + (", dashed: random" if "random" in values else ""), fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        for ax in row[len(panels):]:
            ax.axis("off")
    fig.tight_layout()
    return fig
