"""What a grid is: the presets (scales of the protocol), the paper's rows, and the runs' keys in the order that
fills Table I evenly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from crosssite.training.methods import PAPER_TABLE_I

__all__ = ["PAPER_ROWS", "PRESETS", "RunKey", "grid"]

# Table I of the paper: (method, backbone, label) in the paper's order.
PAPER_ROWS: tuple[tuple[str, str, str], ...] = tuple((m, b, r.label) for (m, b), r in PAPER_TABLE_I.items())


# Configuration overrides of each preset. `paper` is the published protocol (a GPU job). `cpu` is the largest scale
# that fits a budget of 5 minutes per run on 2 cores, chosen on validation parts only (`python
# scripts/choose_defaults.py table`; the evidence is in docs/RESULTS.md). `cpu-small` (6 epochs) reproduces the
# grid of results/cpu-real. The learning rate 5e-4 makes up for runs far shorter than the paper's 100 epochs; short
# high-lr runs leave BN running statistics behind the weights, so both recompute them on the training part before
# each validation (`bn_recalibrate`).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 224, "width": 1.0, "epochs": 100, "batch_per_site": 16, "lr": 1e-4},
    "cpu": {"image_size": 64, "width": 0.25, "epochs": 16, "batch_per_site": 16, "lr": 5e-4, "bn_recalibrate": True},
    "cpu-small": {"image_size": 64, "width": 0.25, "epochs": 6, "batch_per_site": 16, "lr": 5e-4,
                  "bn_recalibrate": True},
}


@dataclass(frozen=True, order=True)
class RunKey:
    """Identifies one run of the grid."""

    method: str
    backbone: str
    fold: int
    seed: int

    @property
    def dirname(self) -> str:
        return f"{self.method}__{self.backbone}/fold{self.fold}_seed{self.seed}"


def grid(rows: Sequence[tuple[str, str]], folds: int, seeds: Sequence[int]) -> Iterator[RunKey]:
    """Runs in the order that fills Table I evenly: every row of fold 0 seed 0 first, and so on."""
    for seed in seeds:
        for fold in range(folds):
            for method, backbone in rows:
                yield RunKey(method, backbone, fold, seed)
