"""Classification metrics, bootstrap intervals and one site's scored predictions -- arrays in, numbers out.

COVID is the positive class (label 1) throughout. A slice is predicted COVID when its probability
P(COVID) = softmax(logits)[:, 1] reaches the threshold (`p >= threshold`, the rule of
`sklearn.metrics.roc_curve`); the threshold is 0.5 unless a model card holds one chosen on validation.

Point estimates come from scikit-learn. `bootstrap_ci` recomputes the same metrics on stratified
resamples from per-score counts, so 1000 resamples of 1000 slices take a fraction of a second.

Undefined metrics are NaN, never a crash: recall and AUC without COVID cases, specificity and AUC
without non-COVID cases, precision without a predicted COVID case. A warning names what is missing.

The release this package reproduces pairs the rows and columns of its confusion matrix in different
orders; here both axes are labelled and share the order of `CLASS_NAMES` (rows: true, columns: predicted).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from crosssite.errors import CrossSiteError

__all__ = ["CLASS_NAMES", "METRICS", "EvaluationError", "ConfusionMatrix", "binary_metrics", "confusion_matrix",
           "bootstrap_ci", "SiteEvaluation", "evaluate_predictions"]

CLASS_NAMES = ("non-COVID", "COVID")
METRICS = ("accuracy", "f1", "recall", "specificity", "precision", "auc")

_BOOTSTRAP_CELLS = 1 << 23  # resamples x distinct scores held in memory at once (64 MiB of int64 counts)
class EvaluationError(CrossSiteError):
    """Labels or probabilities that cannot be scored (wrong shape, values out of range, mismatched runs)."""


def _check_inputs(y_true: object, p_covid: object) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(p_covid, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise EvaluationError(f"y_true and p_covid must be 1-D, got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise EvaluationError(f"y_true has {len(y)} labels but p_covid has {len(p)} probabilities")
    if len(y) == 0:
        raise EvaluationError("cannot score an empty set of predictions")
    if not np.isin(y, (0, 1)).all():
        bad = sorted(set(np.unique(y).tolist()) - {0, 1})
        raise EvaluationError(f"y_true must hold 0 (non-COVID) or 1 (COVID), found {bad[:5]}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise EvaluationError("p_covid must hold finite probabilities in [0, 1]")
    return y.astype(np.int64), p


def _warn_missing_classes(y: np.ndarray) -> None:
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn("no COVID case in y_true: recall and auc are undefined (nan)", UndefinedMetricWarning, 3)
    elif n_pos == len(y):
        warnings.warn(
            "no non-COVID case in y_true: specificity and auc are undefined (nan)", UndefinedMetricWarning, 3
        )


def binary_metrics(y_true: object, p_covid: object, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, F1, recall (sensitivity), specificity, precision and ROC AUC, COVID positive.

    Args:
        y_true: (N,) labels, 1 = COVID, 0 = non-COVID.
        p_covid: (N,) probabilities of COVID.
        threshold: a slice is predicted COVID when `p_covid >= threshold`.
    Returns:
        `{metric: value}` for every name in `METRICS`, as fractions in [0, 1] (NaN where undefined).
    """
    y, p = _check_inputs(y_true, p_covid)
    y_pred = (p >= threshold).astype(np.int64)
    _warn_missing_classes(y)
    both = len(np.unique(y)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return {
            "accuracy": float(skm.accuracy_score(y, y_pred)),
            "f1": float(skm.f1_score(y, y_pred, labels=[0, 1], zero_division=np.nan)),
            "recall": float(skm.recall_score(y, y_pred, labels=[0, 1], zero_division=np.nan)),
            "specificity": float(skm.recall_score(y, y_pred, labels=[0, 1], pos_label=0, zero_division=np.nan)),
            "precision": float(skm.precision_score(y, y_pred, labels=[0, 1], zero_division=np.nan)),
            "auc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
        }


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of (true class, predicted class); rows and columns both follow `labels`."""

    counts: np.ndarray  # (2, 2) int, counts[i, j] = true labels[i] predicted labels[j]
    labels: tuple[str, ...] = CLASS_NAMES

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": "true",
            "columns": "predicted",
            "labels": list(self.labels),
            "counts": self.counts.tolist(),
        }

    def to_csv(self) -> str:
        """The matrix as CSV text with a header row and a label column (`true \\ predicted` in the corner)."""
        lines = ["true \\ predicted," + ",".join(self.labels)]
        lines += [f"{name}," + ",".join(str(int(c)) for c in row) for name, row in zip(self.labels, self.counts)]
        return "\n".join(lines) + "\n"


def confusion_matrix(y_true: object, p_covid: object, threshold: float = 0.5) -> ConfusionMatrix:
    """Confusion matrix at `threshold`, rows = true class, columns = predicted class, order `CLASS_NAMES`."""
    y, p = _check_inputs(y_true, p_covid)
    counts = skm.confusion_matrix(y, (p >= threshold).astype(np.int64), labels=[0, 1])
    return ConfusionMatrix(counts=counts.astype(np.int64))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_from_counts(
    pos_counts: np.ndarray, neg_counts: np.ndarray, predicted_pos: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` for R resamples given how often each distinct score was drawn.

    Args:
        pos_counts: (R, U) times each of the U sorted distinct scores was drawn among COVID cases.
        neg_counts: (R, U) the same among non-COVID cases.
        predicted_pos: (U,) bool, whether a score is at or above the threshold.
    """
    n_pos = pos_counts.sum(axis=1)
    n_neg = neg_counts.sum(axis=1)
    tp = pos_counts[:, predicted_pos].sum(axis=1)
    fp = neg_counts[:, predicted_pos].sum(axis=1)
    fn, tn = n_pos - tp, n_neg - fp
    # Mann-Whitney form of the AUC: P(score of a COVID case > score of a non-COVID case), ties count 1/2.
    neg_below = np.cumsum(neg_counts, axis=1) - neg_counts  # (R, U) non-COVID draws with a lower score
    wins = (pos_counts * (neg_below + 0.5 * neg_counts)).sum(axis=1)
    return {
        "accuracy": _safe_div(tp + tn, n_pos + n_neg),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "recall": _safe_div(tp, n_pos),
        "specificity": _safe_div(tn, n_neg),
        "precision": _safe_div(tp, tp + fp),
        "auc": _safe_div(wins, n_pos * n_neg),
    }


def _resample_counts(codes: np.ndarray, n_values: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, n_values) counts of each score code in n resamples with replacement of `codes`."""
    if len(codes) == 0:
        return np.zeros((n, n_values), dtype=np.int64)
    draws = codes[rng.integers(0, len(codes), size=(n, len(codes)))]  # (n, len(codes))
    flat = (draws + n_values * np.arange(n)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_values).reshape(n, n_values)


def _cluster_counts(
    y: np.ndarray, codes: np.ndarray, groups: np.ndarray, n_values: int, n: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Score-code counts of COVID and non-COVID slices in ``n`` resamples of whole groups (patients).

    Groups are stratified by class (a group holding any COVID slice counts as COVID): each resample draws, with
    replacement, as many groups of each stratum as there are, and takes every slice of every drawn group.
    """
    names, group_of = np.unique(groups, return_inverse=True)
    per_group = np.zeros((2, len(names), n_values), dtype=np.int64)  # (class, group, score code)
    np.add.at(per_group, (y, group_of, codes), 1)
    covid_group = per_group[1].sum(1) > 0
    strata = [np.flatnonzero(covid_group), np.flatnonzero(~covid_group)]
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    chunk = max(1, _BOOTSTRAP_CELLS // max(len(names), n_values))
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        draws = np.zeros((size, len(names)), dtype=np.int64)  # (resample, group): times drawn
        for members, rng in zip(strata, rngs):
            if len(members):
                picked = members[rng.integers(0, len(members), size=(size, len(members)))]
                np.add.at(draws, (np.arange(size)[:, None], picked), 1)
        yield draws @ per_group[1], draws @ per_group[0]


def bootstrap_ci(
    y_true: object,
    p_covid: object,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
    groups: object | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric in `METRICS`.

    Resampling is stratified: each resample draws, with replacement, as many COVID and as many
    non-COVID cases as the data holds, so every resample keeps the class balance (and AUC stays defined).
    With ``groups`` (one patient id per slice) the cases drawn are patients, each with all its slices (a
    cluster bootstrap): slices of one patient are not independent, and resampling them as if they were gives
    intervals that are too narrow.

    Args:
        y_true, p_covid, threshold: as in `binary_metrics`.
        n: number of resamples.
        alpha: 1 - coverage; 0.05 gives 95% intervals.
        seed: seed of the resampling generator.
        groups: None (resample slices) or a patient id per slice (resample patients).
    Returns:
        `{metric: (low, high)}`; (nan, nan) where the metric is undefined on every resample.
    """
    if n < 1:
        raise EvaluationError(f"bootstrap needs n >= 1 resamples, got {n}")
    if not 0.0 < alpha < 1.0:
        raise EvaluationError(f"alpha must lie in (0, 1), got {alpha}")
    y, p = _check_inputs(y_true, p_covid)
    values, codes = np.unique(p, return_inverse=True)
    if groups is not None:
        g = np.asarray(groups, dtype=object).astype(str)
        if g.shape != y.shape:
            raise EvaluationError(f"groups has {g.size} ids for {y.size} slices")
        parts = [_metrics_from_counts(pos, neg, values >= threshold)
                 for pos, neg in _cluster_counts(y, codes, g, len(values), n, seed)]
        return _percentiles(parts, alpha)
    # one generator per class: the draws do not depend on how the resamples are chunked
    rng_pos, rng_neg = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    chunk = max(1, _BOOTSTRAP_CELLS // max(len(values), len(y)))  # resamples per pass, bounding memory
    parts = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        pos_counts = _resample_counts(codes[y == 1], len(values), size, rng_pos)
        neg_counts = _resample_counts(codes[y == 0], len(values), size, rng_neg)
        parts.append(_metrics_from_counts(pos_counts, neg_counts, values >= threshold))
    return _percentiles(parts, alpha)


def _percentiles(parts: list[dict[str, np.ndarray]], alpha: float) -> dict[str, tuple[float, float]]:
    resampled = {name: np.concatenate([part[name] for part in parts]) for name in METRICS}
    quantiles = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out = {}
    for name in METRICS:
        v = resampled[name]
        v = v[np.isfinite(v)]
        low, high = np.percentile(v, quantiles) if len(v) else (np.nan, np.nan)
        out[name] = (float(low), float(high))
    return out


@dataclass
class SiteEvaluation:
    """Metrics of one model on one site under one normalisation strategy."""

    site: str
    strategy: str  # "own" (a site the model was trained on), "site:<name>", "shared", or a strategy of `STRATEGIES`
    description: str  # the strategy in words, for tables
    n: int
    threshold: float
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    confusion: ConfusionMatrix
    alpha: float = 0.05
    resampled: str = "slices"  # what the bootstrap drew: "slices" or "patients"

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "site": self.site,
            "strategy": self.strategy,
            "description": self.description,
            "n": self.n,
            "n_covid": int(self.confusion.counts[1].sum()),
            "threshold": self.threshold,
            "metrics": {k: num(v) for k, v in self.metrics.items()},
            "ci": {k: [num(lo), num(hi)] for k, (lo, hi) in self.ci.items()},
            "ci_level": 1 - self.alpha,
            "ci_resampled": self.resampled,
            "confusion_matrix": self.confusion.to_dict(),
        }


def evaluate_predictions(
    site: str,
    y_true: object,
    p_covid: object,
    *,
    strategy: str = "own",
    description: str = "the site's own statistics",
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    patients: object | None = None,
) -> SiteEvaluation:
    """Point metrics, bootstrap intervals (over ``patients`` where given, else slices) and confusion matrix of
    one site's predictions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # NaN metrics are reported as such
        metrics = binary_metrics(y_true, p_covid, threshold)
        ci = bootstrap_ci(y_true, p_covid, n=n_boot, alpha=alpha, seed=seed, threshold=threshold, groups=patients)
    return SiteEvaluation(
        site=site,
        strategy=strategy,
        description=description,
        n=len(np.asarray(y_true)),
        threshold=threshold,
        metrics=metrics,
        ci=ci,
        confusion=confusion_matrix(y_true, p_covid, threshold),
        alpha=alpha,
        resampled="slices" if patients is None else "patients",
    )


