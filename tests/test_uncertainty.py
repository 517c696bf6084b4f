"""Intervals and paired tests behind method rankings, and the ROAD (debiased) masker.

References are independent: a simulation with a known mean, the exact signed-rank
distribution by enumerating every sign assignment, literal nearest-neighbour loops for
the interpolation, closed forms for a linear signal.
"""
from __future__ import annotations

import inspect
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from attnlab.evaluate import (bootstrap_ci, paired_test, patch_masker, pointing_game, pointing_hits,
                              road_like, road_masker, sequence_masker, stream_masker)
from attnlab.evaluate.summaries import perturbation_curves


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_covers_the_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(0)
    true_mean, n, trials = 0.7, 40, 300
    covered = 0
    for trial in range(trials):
        values = true_mean + 0.1 * rng.standard_normal(n)
        lo, hi = bootstrap_ci(values, resamples=500, seed=trial)
        covered += lo <= true_mean <= hi
    # percentile bootstrap of a mean undercovers slightly at n = 40 (about 0.93);
    # the binomial sd of the rate over 300 trials is about 0.015
    assert 0.88 <= covered / trials <= 0.985


def test_bootstrap_width_matches_the_normal_closed_form():
    values = np.random.default_rng(1).standard_normal(400)
    lo, hi = bootstrap_ci(values, resamples=4000, seed=0)
    se = values.std(ddof=0) / math.sqrt(values.size)          # the bootstrap's own standard error
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.08)
    assert lo < values.mean() < hi


def test_bootstrap_is_seeded_drops_nan_and_handles_degenerate_input():
    v = np.array([0.2, np.nan, 0.5, 0.9, 0.4])
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v[~np.isnan(v)], seed=3)
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25)
    assert all(math.isnan(b) for b in bootstrap_ci([np.nan, np.nan]))
    with pytest.raises(ValueError, match="resamples=0"):
        bootstrap_ci(v, resamples=0)


# --------------------------------------------------------------------------- paired test
def _exact_signed_rank_p(diff: np.ndarray, greater: bool) -> float:
    """P(W+ >= observed) (or W+ <= for 'less') over all 2^n sign flips; no ties or zeros."""
    ranks = np.argsort(np.argsort(np.abs(diff))) + 1
    observed = ranks[diff > 0].sum()
    stats = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(diff))]
    stats = np.array(stats)
    return float(np.mean(stats >= observed) if greater else np.mean(stats <= observed))


@pytest.mark.parametrize("higher", [True, False])
def test_paired_test_is_the_exact_one_sided_signed_rank_test(higher):
    rng = np.random.default_rng(2)
    baseline = rng.uniform(size=11)
    shift = rng.uniform(0.01, 0.3, size=11)
    shift[np.argsort(shift)[[1, 4]]] *= -1                     # two (small) of eleven go the other way
    scores = baseline + shift                                  # mostly higher than the baseline
    result = paired_test(scores, baseline, higher_is_better=higher, alpha=0.05)
    expected = _exact_signed_rank_p(scores - baseline, greater=higher)
    assert result["p"] == pytest.approx(expected, rel=1e-9)
    assert result["n"] == 11
    assert result["better"] == (expected < 0.05)
    assert (result["p"] < 0.05) == higher                      # only the right direction is supported


@pytest.mark.parametrize("higher", [True, False])
def test_paired_test_is_exact_with_ties_and_zeros_and_fast(higher):
    """Tied |differences| (mid-ranks) and zero differences (dropped): the p-value is the
    literal enumeration's over all 2^n sign patterns (scipy's own test falls back to a
    permutation test of 9,999 resamples there, seconds per call); beyond EXACT_MAX pairs,
    scipy's normal approximation."""
    from attnlab.evaluate.uncertainty import EXACT_MAX
    from scipy.stats import wilcoxon

    diff = np.array([0.1, -0.1, 0.2, 0.2, 0.2, -0.05, 0.0, 0.3, 0.0, 0.1, -0.3, 0.4, 0.05, 0.25])
    result = paired_test(diff, np.zeros_like(diff), higher_is_better=higher)
    d = diff[diff != 0]
    size = np.abs(d)
    midranks = [1 + np.sum(size < v) + (np.sum(size == v) - 1) / 2 for v in size]     # ties share their mean rank
    observed = sum(r for r, x in zip(midranks, d) if x > 0)
    stats = np.array([sum(r for r, s in zip(midranks, signs) if s)
                      for signs in itertools.product([0, 1], repeat=len(d))])
    expected = np.mean(stats >= observed - 1e-9) if higher else np.mean(stats <= observed + 1e-9)
    assert result["p"] == pytest.approx(expected, rel=1e-12) and result["n"] == diff.size
    rng = np.random.default_rng(0)
    many = np.round(rng.normal(0.05, 0.2, size=EXACT_MAX + 30), 2)         # ties and zeros
    side = "greater" if higher else "less"
    assert paired_test(many, np.zeros_like(many), higher_is_better=higher)["p"] == pytest.approx(
        wilcoxon(many, alternative=side, method="approx").pvalue)


def test_paired_test_edge_cases():
    assert paired_test([0.3, 0.4], [0.3, 0.4], higher_is_better=True) == {"p": 1.0, "better": False, "n": 2}
    nan = paired_test([np.nan], [0.1], higher_is_better=True)
    assert math.isnan(nan["p"]) and nan["n"] == 0 and not nan["better"]
    with pytest.raises(ValueError, match="alpha=1.5"):
        paired_test([1.0], [0.0], higher_is_better=True, alpha=1.5)
    with pytest.raises(ValueError, match=r"scores have shape \(3,\), baseline \(2,\)"):
        paired_test([1.0, 2.0, 3.0], [0.0, 1.0], higher_is_better=True)


def test_pointing_hits_per_sample():
    imp = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 2.0, 0.0]])
    evidence = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    hits = pointing_hits(imp, evidence)
    assert hits[:3].tolist() == [1.0, 0.5, 0.0] and math.isnan(hits[3])
    assert pointing_game(imp, evidence) == pytest.approx(0.5)


class OnlyItem(nn.Module):
    """logits = [x[:, k].sum(), 0]: the class-0 probability depends on item k only."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x[:, self.k].sum(dim=-1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_perturbation_curves_attach_intervals_and_tests_against_random():
    n, t = 30, 8
    x = 2.0 + torch.rand(n, t, 2)
    knows = torch.zeros(n, t)
    knows[:, 3] = 1.0                                          # ranks the one item that matters first
    rand = torch.rand(n, t, generator=torch.Generator().manual_seed(0))
    aucs, _ = perturbation_curves(OnlyItem(3), x, {"knows": knows, "random": rand}, sequence_masker(0.0),
                                  target=torch.zeros(n, dtype=torch.long), steps=None, batch_size=64,
                                  resamples=200, seed=0, alpha=0.01)
    assert set(aucs) == {"deletion_auc", "insertion_auc", "deletion_auc_ci", "insertion_auc_ci",
                         "deletion_auc_vs_random", "insertion_auc_vs_random"}
    assert set(aucs["deletion_auc_vs_random"]) == {"knows"}
    for mode in ("deletion", "insertion"):
        for m, ci in aucs[f"{mode}_auc_ci"].items():
            assert ci["lo"] <= aucs[f"{mode}_auc"][m] <= ci["hi"]
        assert aucs[f"{mode}_auc_vs_random"]["knows"]["better"]
    # the item goes first: deletion reaches 0.5 after one of 8 steps; the closed form of the area
    p0 = torch.sigmoid(x[:, 3].sum(-1).double())
    assert aucs["deletion_auc"]["knows"] == pytest.approx(float(((p0 + 0.5) / 2 / t + 0.5 * (1 - 1 / t)).mean()))


# --------------------------------------------------------------------------- ROAD
def _literal_interpolation(x: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """x [B, T, D], keep [B, T]: a loop scanning for the nearest kept items."""
    out = x.clone()
    b_n, t_n = keep.shape
    for b in range(b_n):
        kept = [t for t in range(t_n) if keep[b, t]]
        for t in range(t_n):
            if keep[b, t]:
                continue
            left = [k for k in kept if k < t]
            right = [k for k in kept if k > t]
            if left and right:
                l, r = left[-1], right[0]
                out[b, t] = x[b, l] + (t - l) / (r - l) * (x[b, r] - x[b, l])
            elif left:
                out[b, t] = x[b, left[-1]]
            elif right:
                out[b, t] = x[b, right[0]]
            else:
                out[b, t] = fill
    return out


def test_road_sequence_matches_a_literal_loop():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, 2, 3, generator=gen, dtype=torch.float64)
    keep = torch.rand(6, 9, generator=gen) < 0.5
    keep[0] = False                                            # nothing kept: fill
    keep[1] = True                                             # nothing removed
    keep[2] = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)   # both edges one-sided
    out = road_masker(0.0, fill=-7.0)(x, keep)
    expected = _literal_interpolation(x.flatten(2), keep, -7.0).view_as(x)
    torch.testing.assert_close(out, expected)


def test_road_patches_interpolate_along_frames_at_each_grid_position():
    frames, patch, size, c = 5, 2, 4, 3
    grid = size // patch
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, frames, c, size, size, generator=gen, dtype=torch.float64)
    keep = torch.rand(2, frames * grid * grid, generator=gen) < 0.5
    out = road_masker(0.0, patches=(frames, patch, size))(x, keep)
    expected = x.clone()
    for b in range(2):
        for r in range(grid):
            for col in range(grid):
                rows, cols = slice(r * patch, (r + 1) * patch), slice(col * patch, (col + 1) * patch)
                seq = x[b, :, :, rows, cols].reshape(1, frames, -1)              # this position over frames
                k = torch.tensor([bool(keep[b, f * grid * grid + r * grid + col]) for f in range(frames)])
                imputed = _literal_interpolation(seq, k[None], 0.0)[0]
                expected[b, :, :, rows, cols] = imputed.view(frames, c, patch, patch)
    torch.testing.assert_close(out, expected)


def test_road_imputes_a_linear_signal_exactly_and_its_noise_is_seeded():
    t = torch.arange(12, dtype=torch.float64)
    x = (1.5 + 0.25 * t)[None, :, None].expand(400, 12, 4).contiguous()   # linear along the items
    keep = torch.rand(400, 12, generator=torch.Generator().manual_seed(6)) < 0.4
    keep[:, 0] = keep[:, -1] = True                            # interior gaps only
    torch.testing.assert_close(road_masker(0.0)(x, keep), x)   # interpolation of a line is the line
    a = road_masker(0.3, seed=1)(x, keep)
    b = road_masker(0.3, seed=1)(x, keep)
    c = road_masker(0.3, seed=2)(x, keep)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[keep], x[keep])                       # kept items untouched
    residual = (a - x)[~keep]
    assert residual.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(residual.mean().item()) < 0.02
    relative = road_masker(0.3, seed=1, reference=x)(x, keep)  # noise as a fraction of the inputs' std
    assert (relative - x)[~keep].std().item() == pytest.approx(0.3 * x.std().item(), rel=0.05)


def test_road_like_follows_the_constant_maskers_items():
    x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    keep = torch.rand(2, 16, generator=torch.Generator().manual_seed(7)) < 0.5
    road = road_like(patch_masker(4, 2, 4), noise=0.0)
    torch.testing.assert_close(road(x, keep), road_masker(0.0, patches=(4, 2, 4))(x, keep))
    seq = road_like(sequence_masker(0.0), noise=0.0)
    torch.testing.assert_close(seq(x, keep[:, :4]), road_masker(0.0)(x, keep[:, :4]))
    assert road_like(stream_masker([1, 2]), noise=0.0) is None
    assert road_like(lambda x, keep: x) is None
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        road_masker()(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep has shape \(2, 3\), expected x.shape\[:2\] = \(2, 4\)"):
        road_masker()(torch.zeros(2, 4, 1), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise=-1"):
        road_masker(-1)


# --------------------------------------------------------------------------- params and report
def test_evaluate_params_default_to_the_library_defaults():
    from attnlab import config as c

    ev, cl = c.Evaluate.model_fields, c.ClassifierEvaluate.model_fields
    assert ev["resamples"].default == inspect.signature(bootstrap_ci).parameters["resamples"].default
    assert ev["alpha"].default == inspect.signature(paired_test).parameters["alpha"].default
    assert cl["road_noise"].default == inspect.signature(road_masker).parameters["noise"].default
    assert ev["seed"].default == inspect.signature(road_masker).parameters["seed"].default
    assert "debiased" not in c.TokensEvaluate.model_fields and "debiased" not in c.FusionEvaluate.model_fields


def test_random_sentence_claims_only_what_the_test_supports():
    from attnlab.report.classifier import method_table, random_sentence, road_paragraph

    faith = {"deletion_auc": {"a": 0.5, "b": 0.7, "c": 0.9, "random": 0.8},
             "insertion_auc": {"a": 0.9, "b": 0.6, "c": 0.5, "random": 0.6},
             "deletion_auc_ci": {m: {"lo": v - 0.05, "hi": v + 0.05}
                                 for m, v in {"a": 0.5, "b": 0.7, "c": 0.9, "random": 0.8}.items()},
             "deletion_auc_vs_random": {"a": {"p": 0.001, "better": True, "n": 40},
                                        "b": {"p": 0.2, "better": False, "n": 40},
                                        "c": {"p": 0.99, "better": False, "n": 40}}}
    text, all_beat = random_sentence(faith, 0.05)
    assert "p < 0.05): a (p = 0.001)." in text
    assert "not significant at 0.05: b (p = 0.2)" in text
    assert text.endswith("No better than random: c.") and not all_beat
    table = method_table({"faithfulness": faith})
    assert table["method"].tolist() == ["a", "b", "random", "c"]
    assert table.loc[0, "deletion 95% CI"] == "[0.450, 0.550]" and table.loc[2, "deletion p vs random"] == "–"
    road = {"deletion_auc": {"a": 0.5, "b": 0.95, "c": 0.9, "random": 0.8}, "same_ranking": False,
            "rank_correlation": 0.67}
    assert "with ROAD: a < random < c < b — the ranking CHANGES" in road_paragraph(faith, road)


def test_faithfulness_example_runs_as_written():
    """docs/library.md's block on intervals and ROAD, verbatim (tests/docblocks.py): its
    model is OnlyItem(3), so ranking item 3 first beats random."""
    import docblocks

    namespace = docblocks.run_python("library-faithfulness")
    x = namespace["x"]
    torch.testing.assert_close(namespace["model"](x), OnlyItem(3)(x))
    lo, hi = bootstrap_ci(namespace["curve"].auc, resamples=1000, seed=0)
    assert lo <= float(namespace["curve"].auc.mean()) <= hi
    assert paired_test(namespace["curve"].auc, namespace["rand"].auc, higher_is_better=False)["better"]


def test_evidence_scores_of_a_perfect_map_beat_random():
    from attnlab.workflow import _evidence_scores

    gen = torch.Generator().manual_seed(8)
    evidence = torch.zeros(30, 10, dtype=torch.bool)
    evidence[torch.arange(30), torch.randint(0, 10, (30,), generator=gen)] = True
    evidence[3] = False                                        # no evidence: undefined, dropped
    importance = {"perfect": evidence.float(), "random": torch.rand(30, 10, generator=gen)}
    means, ci, tests = _evidence_scores(importance, evidence, None, resamples=200, seed=0, alpha=0.05)
    assert means["auroc"]["perfect"] == 1.0 and ci["auroc"]["perfect"] == {"lo": 1.0, "hi": 1.0}
    assert means["pointing_game"]["perfect"] == 1.0
    for score in ("auroc", "pointing_game"):
        assert tests[score]["perfect"]["better"] and tests[score]["perfect"]["n"] == 29
        assert set(tests[score]) == {"perfect"}
        lo, hi = ci[score]["random"]["lo"], ci[score]["random"]["hi"]
        assert lo <= means[score]["random"] <= hi


def test_perturbation_curves_of_one_mode_only():
    x = torch.rand(4, 5, 2)
    imp = {"a": torch.rand(4, 5), "random": torch.rand(4, 5)}
    kw = dict(target=torch.zeros(4, dtype=torch.long), steps=None, batch_size=8)
    aucs, curves = perturbation_curves(OnlyItem(1), x, imp, sequence_masker(0.0), modes=("deletion",),
                                       resamples=10, **kw)
    assert set(aucs) == {"deletion_auc", "deletion_auc_ci", "deletion_auc_vs_random"} and set(curves) == {"deletion"}
    with pytest.raises(ValueError, match=r"modes=\['removal'\]; expected 'deletion' and/or 'insertion'"):
        perturbation_curves(OnlyItem(1), x, imp, sequence_masker(0.0), modes=("removal",), **kw)
