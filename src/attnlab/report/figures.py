"""Figures shared by the reports. Each function returns a matplotlib Figure."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


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
    """Per-layer x per-head attention maps ``[L, H, Lq, Lk]`` of one sample (rows: layers)."""
    n_layers, n_heads = attn_lhqk.shape[:2]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.2 * n_heads, 2.2 * n_layers), squeeze=False)
    vmax = float(np.quantile(attn_lhqk, 0.995)) or None
    for l in range(n_layers):
        for h in range(n_heads):
            ax = axes[l, h]
            ax.imshow(attn_lhqk[l, h], cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if l == n_layers - 1:
                ax.set_xlabel(f"key {item}")
            if h == 0:
                ax.set_ylabel(f"{layer_names[l]}\nquery {item}", fontsize=8)
            if l == 0:
                ax.set_title(f"head {h}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def importance_by_class(importance_nt: np.ndarray, y: np.ndarray, classes: Sequence[str],
                        item: str = "item", title: str = "") -> plt.Figure:
    """Mean (± one standard deviation) importance per item position, one panel per class."""
    n_cls = len(classes)
    fig, axes = plt.subplots(1, n_cls, figsize=(3.2 * n_cls, 2.8), sharey=True, squeeze=False)
    t = np.arange(importance_nt.shape[1])
    for c, ax in enumerate(axes[0]):
        rows = importance_nt[y == c]
        if len(rows):
            mean, std = rows.mean(0), rows.std(0)
            ax.plot(t, mean, color=sns.color_palette()[c % 10])
            ax.fill_between(t, mean - std, mean + std, alpha=0.25, color=sns.color_palette()[c % 10])
        ax.axhline(1.0 / importance_nt.shape[1], color="grey", lw=0.8, ls=":")
        ax.set(title=f"{classes[c]} (n={len(rows)})", xlabel=item)
    axes[0, 0].set_ylabel("importance")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sequence_with_importance(x_tf: np.ndarray, importance_t: np.ndarray, channels: Sequence[str],
                             title: str) -> plt.Figure:
    """A multichannel sequence with its per-timestep importance as a heat band beneath."""
    fig, (ax, band) = plt.subplots(2, 1, figsize=(9, 3.4), sharex=True,
                                   gridspec_kw={"height_ratios": [4, 1]})
    for f in range(x_tf.shape[1]):
        ax.plot(x_tf[:, f], lw=0.9, label=channels[f] if f < len(channels) else str(f))
    ax.legend(fontsize=7, ncol=len(channels), loc="upper right")
    ax.set_title(title, fontsize=10)
    band.imshow(importance_t[None, :], aspect="auto", cmap="magma", interpolation="nearest",
                extent=(-0.5, len(importance_t) - 0.5, 0, 1))
    band.set_yticks([])
    band.set_xlabel("timestep")
    fig.tight_layout()
    return fig
