"""Figures that stand alone: every heatmap carries its colour bar and labelled axes, and
large layer x head grids stay legible (paged, sized to fit)."""
from __future__ import annotations

import numpy as np

from attnlab.report import figures


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_head_grid_of_a_large_model_is_paged_sized_to_fit_and_has_a_colour_bar():
    attn = np.random.default_rng(0).random((12, 12, 8, 8))
    pages = figures.head_grid_pages(attn, [f"layer{i}" for i in range(12)], "sample 0", "token")
    assert len(pages) == 2                                        # 6 layers per page
    for k, fig in enumerate(pages):
        width, _ = fig.get_size_inches()
        assert width <= 16.0 + 1e-9
        assert len(fig.axes) == 6 * 12 + 1 and len(_colorbars(fig)) == 1
        assert "attention probability" in _colorbars(fig)[0].get_ylabel()
        assert f"layers {6 * k + 1}-{6 * k + 6} of 12" in fig._suptitle.get_text()
        panels = [ax for ax in fig.axes if ax not in _colorbars(fig)]
        assert panels[-1].get_xlabel() == "key token" and "query token" in panels[0].get_ylabel()
    small = figures.head_grid_pages(attn[:2, :4], ["l0", "l1"], "t")
    assert len(small) == 1 and "of" not in small[0]._suptitle.get_text()


def test_importance_figures_have_a_colour_bar_on_the_unit_scale():
    rng = np.random.default_rng(1)
    imp = {"a": rng.random(10), "b": rng.random(10)}
    for fig in (figures.importance_bands(imp, "t", "step"),
                figures.frame_strip(rng.random((10, 8, 8)), imp, np.zeros(10, bool), "t"),
                figures.video_overlay(rng.random((2, 8, 8)), {"a": rng.random((2, 2, 2))},
                                      np.zeros((2, 2, 2), bool), "t")):
        (bar,) = _colorbars(fig)
        assert bar.get_ylim() == (0.0, 1.0) and bar.get_ylabel() == "importance / method max"


def test_sanity_figure_draws_each_method_and_the_threshold():
    sanity = {"blocks": ["embed", "layers.0", "head"], "threshold": 0.5,
              "cascading": {"raw": {"1": 1.0, "2": 0.4, "3": 0.2}, "ig": {"1": 0.6, "2": 0.3, "3": 0.1}},
              "independent": {"raw": {"embed": 0.5, "layers.0": 0.3, "head": 1.0},
                              "ig": {"embed": 0.4, "layers.0": 0.2, "head": 0.6}}}
    fig = figures.sanity_curves(sanity)
    left, right = fig.axes
    curves = {line.get_label(): line.get_ydata() for line in left.get_lines() if not line.get_label().startswith("_")}
    assert list(curves) == ["raw", "ig"]
    np.testing.assert_allclose(curves["raw"], [1.0, 1.0, 0.4, 0.2])      # depth 0 is the trained model
    assert [t.get_text() for t in left.get_xticklabels()] == ["trained", "+head", "+layers.0", "+embed"]
    assert sorted(round(p.get_height(), 6) for p in right.patches) == sorted([0.5, 0.3, 1.0, 0.4, 0.2, 0.6])
