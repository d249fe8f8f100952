"""Reports of an experiment: the paper's Tables I-III, ROC curves (Fig. 3), Grad-CAM panels (Fig. 4, 5).

    from crosssite.reporting import build_report
    build_report("runs/exp")        # runs/exp/report.md, runs/exp/report.html, runs/exp/figures/*.png

`tables` reads results.jsonl and computes the tables, `figures` draws the PNGs, `report` writes the documents.
"""

from crosssite.reporting.figures import GradCamCase, gradcam_figure, mean_roc, roc_figure
from crosssite.reporting.report import ReportOutput, build_report
from crosssite.reporting.tables import (
    OURS,
    ROWS,
    PaperRow,
    ReportError,
    RunResult,
    SiteResult,
    Table,
    load_results,
    site_order,
    summarise,
    table_one,
    ttest_pvalues,
    ttest_table,
    validation_ranking,
    validation_table,
)

__all__ = [
    "OURS",
    "ROWS",
    "GradCamCase",
    "PaperRow",
    "ReportError",
    "ReportOutput",
    "RunResult",
    "SiteResult",
    "Table",
    "build_report",
    "gradcam_figure",
    "load_results",
    "mean_roc",
    "validation_ranking",
    "validation_table",
    "roc_figure",
    "site_order",
    "summarise",
    "table_one",
    "ttest_pvalues",
    "ttest_table",
]
