"""Classification metrics, bootstrap intervals, paired t-tests and probability collection.

COVID is the positive class (label 1) throughout. A slice is predicted COVID when its probability
P(COVID) = softmax(logits)[:, 1] reaches the threshold (`p >= threshold`, the rule of
`sklearn.metrics.roc_curve`); the threshold is 0.5 unless a model card holds one chosen on validation.

Point estimates come from scikit-learn. `bootstrap_ci` recomputes the same metrics on stratified
resamples from per-score counts, so 1000 resamples of 1000 slices take a fraction of a second.

Undefined metrics are NaN, never a crash: recall and AUC without COVID cases, specificity and AUC
without non-COVID cases, precision without a predicted COVID case. A warning names what is missing.

The release this package reproduces pairs the rows and columns of its confusion matrix in different
orders; here both axes are labelled and share the order of `CLASS_NAMES` (rows: true, columns: predicted).

`evaluate_model` scores a model on the sites it was trained on (each with its own statistics) and on
external sites once per normalisation strategy of `norm_strategies`: each known site's statistics, their
mean, and AdaBN re-estimation on the external site's images (on a copy of the model); on request also the
test-time strategies of `crosssite.models.adaptation` (``standardise``, ``tent``, ``ensemble``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from crosssite.errors import CrossSiteError

__all__ = [
    "CLASS_NAMES",
    "METRICS",
    "EvaluationError",
    "ConfusionMatrix",
    "PairedTTest",
    "Probabilities",
    "binary_metrics",
    "confusion_matrix",
    "bootstrap_ci",
    "paired_ttest",
    "corrected_resampled_ttest",
    "holm",
    "collect_probabilities",
    "patients_of",
    "card_loader",
    "SiteEvaluation",
    "evaluate_predictions",
    "norm_strategies",
    "evaluate_model",
]

CLASS_NAMES = ("non-COVID", "COVID")
METRICS = ("accuracy", "f1", "recall", "specificity", "precision", "auc")

_BOOTSTRAP_CELLS = 1 << 23  # resamples x distinct scores held in memory at once (64 MiB of int64 counts)
MEAN_STATISTICS = "mean"  # `site_override` value: normalise with the mean of the known sites' statistics
ENSEMBLE = "ensemble"  # `site_override` value: P(COVID) averaged over every known site's statistics


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


class Probabilities(NamedTuple):
    """What a model predicted for each item of a loader, in loader order."""

    index: np.ndarray  # (N,) int64, dataset index of each item
    site: np.ndarray  # (N,) int64, site index the batch carried
    label: np.ndarray  # (N,) int64, true class
    p_covid: np.ndarray  # (N,) float64, softmax(logits)[:, 1]


def _p_covid(model: torch.nn.Module, image: torch.Tensor, site: torch.Tensor,
             site_override: int | Literal["mean", "ensemble"] | None, num_sites: int) -> torch.Tensor:
    """P(COVID) (B,) of one batch under `collect_probabilities`' ``site_override``."""
    from crosssite.models.adaptation import ensemble_probabilities

    if site_override == ENSEMBLE:
        return ensemble_probabilities(model, image, num_sites)
    if site_override == MEAN_STATISTICS:
        site = None
    elif site_override is not None:
        site = torch.full_like(site, site_override)
    out = model(image, site)
    return torch.softmax(getattr(out, "logits", out).float(), dim=1)[:, 1]  # logits (B, 2)


@torch.inference_mode()
def collect_probabilities(
    model: torch.nn.Module,
    loader: object,
    device: str | torch.device = "cpu",
    site_override: int | Literal["mean", "ensemble"] | None = None,
    *,
    num_sites: int = 0,
    standardise: bool = False,
    tta: str = "none",
) -> Probabilities:
    """Run `model` in eval mode over `loader` (dict batches: image, label, site, index) and collect P(COVID).

    Args:
        site_override: None normalises each item with its own site's statistics (the batch's `site`);
            an int uses that site's statistics for every item (a known site's BN on an unseen site);
            `"mean"` passes `site=None`, the mean of the known sites' statistics; `"ensemble"` averages
            P(COVID) over the statistics of sites ``0 .. num_sites - 1``.
        standardise: standardise each image on its own first (`crosssite.models.adaptation.standardise_images`).
        tta: test-time augmentation (`crosssite.data.TTA_MODES`): ``"flip"`` averages P(COVID) over each image
            and its left-right mirror.
    """
    from crosssite.data import TTA_MODES, tta_average
    from crosssite.models.adaptation import standardise_images

    if site_override not in (None, MEAN_STATISTICS, ENSEMBLE) and not isinstance(site_override, int):
        raise EvaluationError(
            f"site_override must be None, an int, {MEAN_STATISTICS!r} or {ENSEMBLE!r}, got {site_override!r}"
        )
    if site_override == ENSEMBLE and num_sites < 1:
        raise EvaluationError("site_override='ensemble' needs num_sites >= 1 (the known sites)")
    if tta not in TTA_MODES:
        raise EvaluationError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters()), None)  # float64 weights (precision=fp64) take float64 inputs
    parts: dict[str, list[np.ndarray]] = {"index": [], "site": [], "label": [], "p_covid": []}
    try:
        for batch in loader:
            image = batch["image"].to(device, dtype, non_blocking=True)
            if standardise:
                image = standardise_images(image)
            site = batch["site"].to(device)
            p = tta_average(lambda x: _p_covid(model, x, site, site_override, num_sites), image, tta)
            parts["p_covid"].append(p.cpu().double().numpy())
            parts["index"].append(batch["index"].cpu().numpy().astype(np.int64))
            parts["site"].append(batch["site"].cpu().numpy().astype(np.int64))
            parts["label"].append(batch["label"].cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not parts["index"]:
        raise EvaluationError("the loader yielded no batch: nothing to evaluate")
    return Probabilities(**{k: np.concatenate(v) for k, v in parts.items()})


@dataclass
class SiteEvaluation:
    """Metrics of one model on one site under one normalisation strategy."""

    site: str
    strategy: str  # "own" (a site the model was trained on), "site:<name>", "mean", "adabn" or "shared"
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


_EXTRA = {
    "standardise": "each slice standardised to the training sites' pixel mean / std",
    "tent": "TENT: AdaBN, then entropy minimisation of the new BN affine parameters on this site's images",
    "ensemble": "P(COVID) averaged over every known site's statistics",
}


def norm_strategies(
    model: torch.nn.Module, site_names: list[str], extra: Sequence[str] = ()
) -> list[tuple[str, str, int | str | None]]:
    """How a site the model was never trained on can be normalised: (key, description, site_override).

    With site-specific layers: each known site's statistics (and adapters / heads), the mean of the known
    sites' statistics, and AdaBN (site_override None: `evaluate_model` re-estimates a new slot). Without
    any site-specific layer there is nothing to choose: one "shared" strategy. ``extra`` adds test-time
    strategies of `crosssite.models.adaptation.STRATEGIES` (``"adabn"`` is always there where it applies):
    ``"standardise"`` (site_override: the mean of the sites, or the shared statistics), ``"tent"`` (None, a
    new slot) and ``"ensemble"`` (`ENSEMBLE`); ``tent`` and ``ensemble`` need site-specific BN.
    """
    from crosssite.models import SiteBatchNorm, SiteModule
    from crosssite.models.adaptation import STRATEGIES

    unknown = [key for key in extra if key not in STRATEGIES]
    if unknown:
        raise EvaluationError(f"adapt: unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    site_bn = any(isinstance(m, SiteBatchNorm) for m in model.modules())
    needs_bn = [key for key in extra if key in ("tent", "ensemble") and not site_bn]
    if needs_bn:
        raise EvaluationError(f"adapt: {needs_bn[0]} needs a model with site-specific batch norm")
    if not any(isinstance(m, SiteModule) for m in model.modules()):
        out: list[tuple[str, str, int | str | None]] = [
            ("shared", "shared statistics (the model has no site-specific layers)", 0)
        ]
        if "standardise" in extra:
            out.append(("standardise", _EXTRA["standardise"], 0))
        return out
    out = [(f"site:{name}", f"statistics of known site {name!r}", i) for i, name in enumerate(site_names)]
    out.append((MEAN_STATISTICS, "mean of the known sites' statistics", MEAN_STATISTICS))
    if site_bn:
        out.append(("adabn", "AdaBN: statistics re-estimated on this site's images", None))
    overrides = {"standardise": MEAN_STATISTICS, "tent": None, "ensemble": ENSEMBLE}
    out += [(key, _EXTRA[key], overrides[key]) for key in dict.fromkeys(extra) if key != "adabn"]
    return out


def patients_of(loader: Iterable, probs: Probabilities) -> list[str] | None:
    """Patient id of each collected slice, when ``loader``'s dataset has them for every slice (else None)."""
    sites = getattr(getattr(loader, "dataset", None), "sites", None)
    if not sites or not all(site.has_patients for site in sites):
        return None
    ids = [sites[s].samples[i].patient for s, i in zip(probs.site, probs.index)]
    return None if any(pid is None for pid in ids) else [str(pid) for pid in ids]


def card_loader(site: Any, card: dict[str, Any], indices: np.ndarray | None = None, *, batch_size: int = 64,
                workers: int = 0) -> Any:
    """Batches of ``site`` (``indices`` of its samples, or all) preprocessed as the model card says: its frame,
    image size and the training part's mean / std."""
    from crosssite.data import build_cache, eval_loader, preprocessing_transform

    transform = preprocessing_transform(card.get("preprocessing") or {"image_size": 224})
    ix = [indices]
    cache = build_cache([site], ix, transform.image_size, frame=transform.frame)
    return eval_loader([site], ix, cache, transform.image_size, batch_size=batch_size, workers=workers,
                       transform=transform)


def evaluate_model(
    model: torch.nn.Module,
    site_names: list[str],
    known: Mapping[str, Iterable],
    external: Mapping[str, Iterable] | None = None,
    *,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    strategies: Sequence[str] = (),
    tta: str = "none",
) -> list[SiteEvaluation]:
    """Evaluate `model` on sites it was trained on (`known`) and on sites it never saw (`external`).

    Args:
        model: a registry model; it is not modified (AdaBN works on a copy).
        site_names: the model's site slots in order (the model card's `site_names`).
        known: site name -> loader of that site alone; the name must be in `site_names`.
        external: site name -> loader; evaluated once per strategy of `norm_strategies`.
        strategies: extra test-time strategies for the external sites (`norm_strategies`' ``extra``):
            ``standardise``, ``tent`` (TENT, Wang et al. ICLR 2021, on a copy), ``ensemble``.
        tta: test-time augmentation of every prediction (`collect_probabilities`; the model card's ``tta``).
    Returns:
        One `SiteEvaluation` per known site, then per external site and strategy.
    """
    results = []
    for name, loader in known.items():
        if name not in site_names:
            raise EvaluationError(
                f"site {name!r} is not one the model was trained on ({', '.join(site_names)}); "
                "evaluate it as an external site"
            )
        probs = collect_probabilities(model, loader, device, site_override=site_names.index(name), tta=tta)
        results.append(
            evaluate_predictions(
                name, probs.label, probs.p_covid, strategy="own", description="the site's own statistics",
                threshold=threshold, n_boot=n_boot, alpha=alpha, seed=seed, patients=patients_of(loader, probs),
            )  # fmt: skip
        )
    for name, loader in (external or {}).items():
        for key, description, override in norm_strategies(model, site_names, strategies):
            target = model
            if override is None:  # AdaBN / TENT: a new slot adapted to this site's images, on a copy
                from crosssite.models import adapt_norm
                from crosssite.models.adaptation import tent_adapt

                target = copy.deepcopy(model)
                override = (tent_adapt if key == "tent" else adapt_norm)(target, loader)
            probs = collect_probabilities(target, loader, device, site_override=override,
                                          num_sites=len(site_names), standardise=key == "standardise", tta=tta)
            results.append(
                evaluate_predictions(
                    name, probs.label, probs.p_covid, strategy=key, description=description,
                    threshold=threshold, n_boot=n_boot, alpha=alpha, seed=seed, patients=patients_of(loader, probs),
                )  # fmt: skip
            )
    return results
