"""Evaluation: metrics and bootstrap intervals (`metrics`), significance tests (`statistics`), and models run over
loaders, on their own sites and on unseen ones under every test-time strategy (`runner`)."""

from crosssite.evaluation.metrics import (
    CLASS_NAMES,
    METRICS,
    ConfusionMatrix,
    EvaluationError,
    SiteEvaluation,
    binary_metrics,
    bootstrap_ci,
    confusion_matrix,
    evaluate_predictions,
)
from crosssite.evaluation.runner import (
    ENSEMBLE,
    MEAN_OF_SITES,
    Probabilities,
    card_loader,
    collect_probabilities,
    evaluate_model,
    norm_strategies,
    patients_of,
)
from crosssite.evaluation.statistics import PairedTTest, corrected_mean_interval, corrected_resampled_ttest, holm, \
    paired_ttest

__all__ = [
    "CLASS_NAMES", "METRICS", "ENSEMBLE", "MEAN_OF_SITES", "EvaluationError", "ConfusionMatrix", "PairedTTest",
    "Probabilities", "binary_metrics", "confusion_matrix", "bootstrap_ci", "paired_ttest",
    "corrected_resampled_ttest", "corrected_mean_interval", "holm", "collect_probabilities", "patients_of",
    "card_loader", "SiteEvaluation",
    "evaluate_predictions", "norm_strategies", "evaluate_model",
]
