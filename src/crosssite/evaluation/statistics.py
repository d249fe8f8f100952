"""Significance tests between matched runs: paired and corrected resampled t-tests, Holm's adjustment."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from crosssite.evaluation.metrics import EvaluationError

__all__ = ["PairedTTest", "paired_ttest", "corrected_resampled_ttest", "corrected_mean_interval", "holm"]


class PairedTTest(NamedTuple):
    """Result of a paired t-test: statistic, two-sided p-value, number of pairs used."""

    t: float
    p: float
    n: int


def paired_ttest(ours: object, other: object) -> PairedTTest:
    """Two-sided paired t-test (`scipy.stats.ttest_rel`) of matched runs, e.g. one AUC per (fold, seed).

    Pairs where either value is NaN (an undefined metric) are left out; `n` counts the pairs used.
    Fewer than two pairs gives t = p = NaN; otherwise the values are scipy's (NaN when all differences are 0).
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise EvaluationError(f"paired t-test needs two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return PairedTTest(float("nan"), float("nan"), int(len(a)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance of the differences
        res = stats.ttest_rel(a, b)
    return PairedTTest(float(res.statistic), float(res.pvalue), int(len(a)))


def corrected_resampled_ttest(ours: object, other: object, test_train_ratio: float) -> PairedTTest:
    """Nadeau and Bengio's corrected resampled t-test (Machine Learning 52, 2003) of matched runs.

    Runs of a cross-validation share most of their training data, so the paired differences are correlated and
    the plain paired t-test is over-confident. The correction inflates the variance of the mean difference:
    ``t = mean(d) / sqrt((1 / J + n_test / n_train) * var(d))`` over the ``J`` pairs, with ``J - 1`` degrees of
    freedom (two-sided p). ``test_train_ratio`` is ``n_test / n_train`` of one run. NaN pairs are left out.
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise EvaluationError(f"corrected t-test needs two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    if not test_train_ratio > 0:
        raise EvaluationError(f"test_train_ratio must be positive, got {test_train_ratio}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    j = len(d)
    if j < 2:
        return PairedTTest(float("nan"), float("nan"), j)
    var = float(np.var(d, ddof=1))
    if var == 0:
        return PairedTTest(float("nan"), float("nan"), j)
    t = float(np.mean(d)) / math.sqrt((1 / j + test_train_ratio) * var)
    return PairedTTest(t, float(2 * stats.t.sf(abs(t), j - 1)), j)


def corrected_mean_interval(values: object, test_train_ratio: float, level: float = 0.95
                            ) -> tuple[float, float, float]:
    """(mean, low, high): a ``level`` interval for the expected score of a cross-validated recipe from its ``J``
    runs' scores, with the variance correction of `corrected_resampled_ttest` (the runs share training data):
    ``mean +- t_{J-1} * sqrt((1 / J + n_test / n_train) * var)``. NaN scores are left out; fewer than 2 give NaN
    bounds."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(v))
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * math.sqrt((1 / len(v) + test_train_ratio)
                                                                     * float(np.var(v, ddof=1)))
    return mean, mean - half, mean + half


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` for multiple comparisons (NaN stays NaN, not counted)."""
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(finite)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


