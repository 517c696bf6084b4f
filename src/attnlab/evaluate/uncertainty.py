"""How sure is a ranking of explanation methods? Intervals over samples and a paired test.

Every score that ranks methods (deletion/insertion AUC, evidence AUROC, pointing game)
is a mean over samples. :func:`bootstrap_ci` gives its percentile bootstrap interval
(Efron & Tibshirani, 1993), resampling the samples with replacement;
:func:`paired_test` asks whether a method beats a baseline scored **on the same
samples** with the one-sided Wilcoxon signed-rank test (Wilcoxon, 1945) of the
per-sample differences; :func:`uncertainty` does both for every method of a table.

NaN marks a sample where a score is undefined (e.g. AUROC of a sample with no
evidence); such samples are dropped (pairwise, in the test).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


def bootstrap_ci(values: Any, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [N]`` (NaNs dropped).

    All ``resamples`` resamples are drawn at once (``[resamples, N]`` indices from a
    ``numpy`` generator seeded with ``seed``), so the interval is reproducible and
    costs one vectorised gather. ``(nan, nan)`` if no value is defined; a single
    value gives a zero-width interval.
    """
    if resamples < 1:
        raise ValueError(f"bootstrap_ci: resamples={resamples}; expected an int >= 1")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level={level}; expected a probability in (0, 1)")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    means = v[idx].mean(axis=1)                                   # [resamples]
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def paired_test(scores: Any, baseline: Any, *, higher_is_better: bool,
                alpha: float = 0.05) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank test that ``scores [N]`` beat ``baseline [N]``,
    sample by sample (``scipy.stats.wilcoxon`` of ``scores - baseline``, alternative
    "greater" if ``higher_is_better`` else "less"; zero differences dropped).

    Returns ``{"p": p-value, "better": p < alpha, "n": pairs used}``; ``p`` is 1.0 when
    every difference is zero (no evidence either way) and NaN when no pair is defined.
    """
    from scipy.stats import wilcoxon

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"paired_test: alpha={alpha}; expected a level in (0, 1)")
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: scores have shape {a.shape}, baseline {b.shape}; "
                         "expected the same samples in both")
    both = ~(np.isnan(a) | np.isnan(b))
    diff = a[both] - b[both]
    if diff.size == 0:
        return {"p": math.nan, "better": False, "n": 0}
    if not np.any(diff != 0):
        return {"p": 1.0, "better": False, "n": int(diff.size)}
    nonzero = diff[diff != 0]
    if nonzero.size <= EXACT_MAX:
        p = exact_signed_rank_p(nonzero, greater=higher_is_better)
    else:                       # scipy's normal approximation (ties corrected), as its "auto" method does
        p = float(wilcoxon(diff, alternative="greater" if higher_is_better else "less", method="approx").pvalue)
    return {"p": p, "better": bool(p < alpha), "n": int(diff.size)}


#: Up to this many non-zero differences the p-value is exact (:func:`exact_signed_rank_p`).
EXACT_MAX = 50


def exact_signed_rank_p(diff: Any, *, greater: bool) -> float:
    """The exact one-sided p-value of the Wilcoxon signed-rank statistic ``T+`` (the sum
    of the ranks of ``|diff|`` whose difference is positive, ties given their mid-rank)
    over all ``2^n`` equally likely sign patterns of the null hypothesis; ``diff`` holds
    no zeros. ``P(T+ >= observed)`` when ``greater``, else ``P(T+ <= observed)``.

    Doubled mid-ranks are integers, so the null distribution is a dynamic programme over
    their sums (``O(n^3)`` at most): exact with ties too, where ``scipy.stats.wilcoxon``
    falls back to a permutation test of 9,999 resamples that took seconds per call."""
    from scipy.stats import rankdata

    d = np.asarray(diff, dtype=np.float64).reshape(-1)
    if d.size == 0:
        return 1.0
    twice = np.rint(2 * rankdata(np.abs(d))).astype(np.int64)         # doubled mid-ranks
    observed = int(twice[d > 0].sum())
    dist = np.zeros(int(twice.sum()) + 1)                              # P(doubled T+ = s)
    dist[0] = 1.0
    top = 0
    for r in twice:                                                   # each rank in T+ or not, 1/2 each
        dist[r:top + r + 1] = 0.5 * dist[r:top + r + 1] + 0.5 * dist[:top + 1].copy()
        dist[:r] *= 0.5
        top += int(r)
    p = dist[observed:].sum() if greater else dist[:observed + 1].sum()
    return float(min(1.0, p))


def uncertainty(per_sample: Mapping[str, Any], *, higher_is_better: bool, baseline: str = "random",
                resamples: int = 1000, seed: int = 0, alpha: float = 0.05,
                ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Bootstrap intervals of every method's mean and its paired test against ``baseline``.

    ``per_sample``: ``{method: [N] scores}`` on the same samples (``baseline`` among them).
    Returns ``({method: {"lo", "hi"}}, {method: {"p", "better", "n"}})``; the second has
    no entry for the baseline itself. Every method's resamples use the same ``seed``:
    methods defined on the same samples are resampled on the same draws.
    """
    if baseline not in per_sample:
        raise ValueError(f"uncertainty: baseline {baseline!r} is not among the methods {list(per_sample)}")
    ci = {}
    for method, values in per_sample.items():
        lo, hi = bootstrap_ci(values, resamples=resamples, seed=seed)
        ci[method] = {"lo": lo, "hi": hi}
    tests = {m: paired_test(v, per_sample[baseline], higher_is_better=higher_is_better, alpha=alpha)
             for m, v in per_sample.items() if m != baseline}
    return ci, tests
