"""Reports of an experiment: the paper's Tables I-III, ROC curves (Fig. 3), Grad-CAM panels (Fig. 4, 5).

    from crosssite.reporting import build_report
    build_report("runs/exp")        # runs/exp/report.md, runs/exp/report.html, runs/exp/figures/*.png

`results` reads results.jsonl, `rows` holds Table I's rows, `tables` renders Table I and the intervals, `claims`
tests the paper's claims (Tables II-III), `choice` ranks the rows on validation, `loso` renders the
leave-one-site-out table, `figures` draws the PNGs, `report` writes the documents.
"""

from crosssite.reporting.choice import chosen_row, validation_ranking, validation_table
from crosssite.reporting.claims import ttest_pvalues, ttest_table
from crosssite.reporting.figures import GradCamCase, gradcam_figure, mean_roc, roc_figure
from crosssite.reporting.report import ReportOutput, build_report
from crosssite.reporting.results import ReportError, RunResult, SiteResult, load_results, site_order
from crosssite.reporting.rows import PAPER_METHOD, ROWS, TableRow, summarise
from crosssite.reporting.tables import Table, table_one

__all__ = [
    "PAPER_METHOD",
    "ROWS",
    "GradCamCase",
    "ReportError",
    "ReportOutput",
    "RunResult",
    "SiteResult",
    "Table",
    "TableRow",
    "build_report",
    "chosen_row",
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
