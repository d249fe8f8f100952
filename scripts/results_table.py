"""The tables docs/RESULTS.md quotes, printed as Markdown from an experiment's results.jsonl.

    python scripts/results_table.py results/cpu-real          # Table I: mean ± std over folds x seeds
    python scripts/results_table.py results/cpu-real --runs   # one line per finished run, with its wall time

Table I is the one `crosssite report DIR` renders (`crosssite.reporting.table_one`); the report adds the
t-tests, ROC curves and Grad-CAM panels.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from crosssite.reporting.results import load_results, site_order
from crosssite.reporting.rows import ROWS, runs_of
from crosssite.reporting.tables import site_letter, table_one


def per_run(out_dir: Path) -> str:
    runs, _ = load_results(out_dir / "results.jsonl")
    sites = site_order(runs)
    head = ["row", "fold", "seed"] + [f"{site_letter(i)} AUC" for i in range(len(sites))] + ["wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in ROWS:
        for run in sorted(runs_of(runs, row), key=lambda r: (r.fold, r.seed)):
            aucs = [run.sites[s].metrics["auc"] if s in run.sites else math.nan for s in sites]
            cells = [row.label, str(run.fold), str(run.seed)] + [f"{100 * a:.2f}" for a in aucs]
            lines.append("| " + " | ".join(cells + [f"{run.wall_s:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--runs", action="store_true", help="one line per finished run")
    args = parser.parse_args()
    if args.runs:
        print(per_run(args.out_dir))
    else:
        runs, _ = load_results(args.out_dir / "results.jsonl")
        print(table_one(runs, site_order(runs)).to_markdown())


if __name__ == "__main__":
    main()
