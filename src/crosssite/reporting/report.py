"""`report.md` and a self-contained `report.html` for an experiment directory.

The report states how the data were split and grouped, then gives Table I (mean ± std over folds x
seeds, the paper's AUC beside ours), Tables II and III (paired t-tests of ours against every other row),
Fig. 3 (mean ROC curves per site) and Fig. 4/5 (Grad-CAM of correct and failed test cases of ours), and
lists every run with its machine, commit and wall time.

The document is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice:
to Markdown, with figures as PNG files beside it, and to HTML, with the same PNGs embedded as base64 so
the file needs nothing else.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crosssite
from crosssite.errors import CrossSiteError
from crosssite.gradcam import finest_stage, grad_cam
from crosssite.rundir import PREDICTIONS, Prediction, RunDirError, read_predictions
from crosssite.reporting.figures import GradCamCase, gradcam_figure, roc_figure
from crosssite.reporting.choice import validation_table
from crosssite.reporting.claims import claims_table, ttest_table, verdict_table
from crosssite.reporting.loso import loso_table
from crosssite.reporting.results import PAPER_SITES, ReportError, RunResult, load_results, site_layout, site_order
from crosssite.reporting.rows import PAPER_METHOD, ROWS, runs_of
from crosssite.reporting.tables import Table, interval_table, site_letter, table_one

__all__ = ["ReportOutput", "build_report", "PATIENT_GROUPING"]

# How each real site's slices are grouped into patients, and what that means for the test numbers. The
# sars_cov2_ct text is that of runs made before their folds were grouped by pseudo-patient (their results carry no
# "grouping"); `PSEUDO_PATIENT_GROUPING` is said of the runs that were.
PSEUDO_PATIENT_GROUPING = (
    "no patient ids; folds and validation parts are grouped by pseudo-patient (near-duplicate slices and runs of "
    "consecutive file numbers, `crosssite.data.groups`), so no near-duplicate pair of slices sits on both sides of "
    "a split; unlike slices of one patient still may."
)
PATIENT_GROUPING = {
    "sars_cov2_ct": (
        "no per-image patient ids (about 120 patients in all), so folds split slices, not patients: slices of "
        "one patient, often near-duplicates, may sit in both the training and the test part, which makes "
        "this site's numbers optimistic."
    ),
    "synthetic": "synthetic site with generated patient ids; folds are grouped by patient.",
    "covid_ct": (
        "patient ids from `Meta/COVID-CT-MetaInfo.csv` and `Meta/NonCOVID-CT-MetaInfo.csv`; folds are grouped "
        "by patient, so no patient has slices in both the training and the test part."
    ),
}


# ----------------------------------------------------------------------------------------------- blocks
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class FigureBlock:
    path: Path
    caption: str


Block = Heading | Paragraph | Bullets | Table | FigureBlock


def _inline_html(text: str) -> str:
    """Escape text and turn the Markdown inline marks used here (`code`, **bold**) into HTML."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _to_markdown(blocks: Sequence[Block], base: Path) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            parts.append(b.to_markdown())
        else:
            parts.append(f"![{b.caption}]({b.path.relative_to(base).as_posix()})\n\n*{b.caption}*")
    return "\n\n".join(parts) + "\n"


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.body)
    caption = f"<p class='caption'>{_inline_html(t.caption)}</p>" if t.caption else ""
    return (
        f"<p><strong>{html.escape(t.title)}</strong></p><div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table></div>{caption}"
    )


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
.scroll { overflow-x: auto; }
.caption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _to_html(blocks: Sequence[Block], title: str) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(_table_html(b))
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(b.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption class='caption'>{_inline_html(b.caption)}</figcaption></figure>"
            )
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------------------------- sections
def _distinct(values: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _config_values(runs: Sequence[RunResult], key: str) -> str:
    values = _distinct([r.config.get(key) for r in runs if key in r.config])
    return ", ".join(str(v) for v in values) if values else "not recorded"


def _grouping_text(runs: Sequence[RunResult], site: str) -> str:
    layout = site_layout(runs, site)
    if next((r.site_info[site].get("grouping") for r in runs if site in r.site_info), None) == "pseudo-patient":
        return PSEUDO_PATIENT_GROUPING
    if layout in PATIENT_GROUPING:
        return PATIENT_GROUPING[layout]
    has_patients = next((r.site_info[site].get("has_patients") for r in runs if site in r.site_info), None)
    if has_patients is True:
        return "patient ids given by the site's layout; folds are grouped by patient."
    if has_patients is False:
        return (
            "no patient ids, so folds split slices, not patients: slices of one patient may sit in both the "
            "training and the test part."
        )
    return f"layout `{layout}`; patient grouping not recorded in results.jsonl (see `crosssite.data` for the layout)."


def _protocol_section(runs: Sequence[RunResult], sites: Sequence[str]) -> list[Block]:
    protocol = _config_values(runs, "protocol")
    if protocol == "official":
        split_text = "the official split of each site (train / val / test); the test part is scored once."
    else:
        split_text = (
            f"{_config_values(runs, 'folds')}-fold cross-validation per site, folds stratified by class and grouped "
            f"by patient where patient ids exist; a validation part ({_config_values(runs, 'val_fraction')} of the "
            "training folds) chooses the checkpoint, and each fold's test part is scored once, never used for "
            "selection."
        )
    site_items = []
    for pos, site in enumerate(sites):
        sizes = _distinct([len(r.sites[site].y_true) for r in runs if site in r.sites])
        layout = site_layout(runs, site)
        paper = f" (the paper's site {site_letter(PAPER_SITES.index(layout))})" if layout in PAPER_SITES else ""
        site_items.append(
            f"**Site {site_letter(pos)}: `{site}`**{paper}: test slices per run {'/'.join(map(str, sizes))}; "
            + _grouping_text(runs, site)
        )
    return [
        Heading("Protocol"),
        Paragraph(f"**Split**: {split_text} Seeds: {_config_values(runs, 'seed')}."),
        Bullets(site_items),
        Paragraph(
            f"**Scale**: image size {_config_values(runs, 'image_size')} px, width {_config_values(runs, 'width')}, "
            f"epochs {_config_values(runs, 'epochs')}, batch {_config_values(runs, 'batch_per_site')} per site, "
            f"learning rate {_config_values(runs, 'lr')}. The paper used 224 px, width 1 and 100 epochs."
        ),
        Paragraph(
            "The metrics are those each run recorded in results.jsonl for its test part, with COVID as the "
            "positive class; AUC and ROC curves come from the recorded P(COVID) of every test slice."
        ),
    ]


def _machine_text(machine: Any) -> str:
    if isinstance(machine, dict):
        device = machine.get("gpu") or machine.get("cpu") or machine.get("processor") or "?"
        return f"{machine.get('host', '?')} ({device}, {machine.get('cpu_count', '?')} CPUs)"
    return str(machine)


def busy_hours(runs: Sequence[RunResult]) -> float:
    """Hours during which at least one run was training: the union of the runs' (finish - wall time, finish)
    intervals, so runners side by side count once and the gaps between invocations not at all."""
    spans = sorted((end - r.wall_s, end) for r in runs if np.isfinite(r.wall_s) and r.finished_at
                   for end in [datetime.fromisoformat(r.finished_at).timestamp()])
    total, reach = 0.0, -np.inf
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total / 3600


def _runs_section(runs: Sequence[RunResult], notes: Sequence[str]) -> list[Block]:
    walls = [r.wall_s for r in runs if np.isfinite(r.wall_s)]
    wall_text = (
        f"median {statistics.median(walls) / 60:.1f} min per run, {sum(walls) / 3600:.2f} h summed over runs, "
        f"{busy_hours(runs):.2f} h elapsed while any run trained (runners side by side counted once)"
        if walls
        else "not recorded"
    )
    missing = [row.label for row in ROWS if not runs_of(runs, row)]
    body = [
        [r.method, r.backbone, str(r.fold), str(r.seed), f"{r.wall_s:.0f}", _machine_text(r.machine),
         r.git_commit[:12], r.finished_at]
        for r in sorted(runs, key=lambda r: (r.method, r.backbone, r.seed, r.fold))
    ]  # fmt: skip
    table = Table(
        "Runs",
        ["method", "backbone", "fold", "seed", "wall s", "machine", "commit", "finished (UTC)"],
        body,
    )
    items = [
        f"{len(runs)} finished runs; wall time {wall_text}.",
        "Machines: " + "; ".join(_distinct([_machine_text(r.machine) for r in runs])) + ".",
        "Commits: " + ", ".join(f"`{c}`" for c in _distinct([r.git_commit for r in runs])) + ".",
    ]
    if missing:
        items.append("Rows of Table I without any run: " + ", ".join(missing) + ".")
    items += list(notes)
    other = sorted({(r.method, r.backbone) for r in runs} - {(row.method, row.backbone) for row in ROWS})
    if other:
        items.append("Rows beyond the paper's Table I (tabulated without the paper's numbers): "
                     + ", ".join(f"{m}/{b}" for m, b in other) + ".")
    return [Heading("Runs"), Bullets(items), table]


def _roc_section(runs: Sequence[RunResult], sites: Sequence[str], fig_dir: Path) -> list[Block]:
    blocks: list[Block] = [
        Heading("Fig. 3: ROC curves"),
        Paragraph(
            "Mean ROC per row: each run's test ROC is interpolated on a common false-positive-rate grid and the "
            "true-positive rates are averaged; the legend's AUC is the mean ± std of the runs' AUCs (as in Table I). "
            "(a) backbones, (b) baselines on the redesigned backbone, (c) comparison methods."
        ),
    ]
    for pos, site in enumerate(sites):
        name = f"Site {site_letter(pos)} ({site})"
        path = roc_figure(runs, site, f"ROC curves, {name}", fig_dir / f"roc_site{site_letter(pos)}_{site}.png")
        blocks.append(FigureBlock(path, f"Fig. 3, {name}: mean ROC curves over folds x seeds."))
    return blocks


# ---------------------------------------------------------------------------------------------- Grad-CAM
def _test_slices(run_dir: Path, site: str) -> list[Prediction]:
    """`site`'s test part with labels and the run's P(COVID), from run_dir/predictions.csv (the training
    engine writes one row per validation and test slice of the best model)."""
    path = run_dir / PREDICTIONS
    if not path.is_file():
        raise ReportError(f"{path}: not found, so the test part of {site!r} is unknown")
    try:
        out = [p for p in read_predictions(run_dir, "test") if p.site == site]
    except RunDirError as e:
        raise ReportError(str(e)) from None
    if not out:
        raise ReportError(f"{path}: no test slice of site {site!r}")
    return out


def _pick_cases(labels: np.ndarray, p: np.ndarray, k: int, threshold: float = 0.5) -> tuple[list[int], list[int]]:
    """Indices of the k most confident correct cases (COVID first, as the paper shows lesions) and the k
    most confident failures."""
    pred = (p >= threshold).astype(np.int64)
    confidence = np.abs(p - threshold)
    correct = np.flatnonzero(pred == labels)
    failed = np.flatnonzero(pred != labels)
    correct = correct[np.lexsort((-confidence[correct], -labels[correct]))][:k]
    failed = failed[np.argsort(-confidence[failed], kind="stable")][:k]
    return correct.tolist(), failed.tolist()


def _gradcam_for_site(
    model: torch.nn.Module, card: dict[str, Any], run_dir: Path, site: str, k: int
) -> tuple[list[GradCamCase], list[GradCamCase], int, float]:
    """Correct and failed cases of `site` with their maps, the number of test slices, and the largest gap
    between the P(COVID) recomputed here and the run's own (a check that model and preprocessing match)."""
    from crosssite.data import preprocessing_transform, read_image

    names = list(card.get("site_names") or [])
    if site not in names:
        raise ReportError(f"the model card of {run_dir} does not name site {site!r} (sites: {names})")
    slices = _test_slices(run_dir, site)
    labels = np.array([s.label for s in slices])
    threshold = float(card.get("threshold", 0.5))
    correct, failed = _pick_cases(labels, np.array([s.p_covid for s in slices]), k, threshold)
    chosen = correct + failed
    if not chosen:
        return [], [], len(slices), 0.0
    transform = preprocessing_transform(card.get("preprocessing") or {"image_size": 224})  # the model's own
    images = torch.stack([transform(read_image(slices[i].path, slices[i].frame)) for i in chosen])  # (n, 3, S, S)
    out = grad_cam(model, images, site=names.index(site), stage=finest_stage(model, images.shape[-1]))
    gap = float(np.max(np.abs(out.p_covid.double().numpy() - [slices[i].p_covid for i in chosen])))

    def case(j: int) -> GradCamCase:
        grey = images[j, 0].numpy()
        grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-12)  # what the model saw, in [0, 1]
        i = chosen[j]
        return GradCamCase(grey, out.cam[j].numpy(), int(labels[i]), float(out.p_covid[j]), slices[i].path.name)

    return [case(j) for j in range(len(correct))], [case(j) for j in range(len(correct), len(chosen))], len(slices), gap


def _gradcam_section(
    exp_dir: Path, runs: Sequence[RunResult], sites: Sequence[str], fig_dir: Path, k: int
) -> list[Block]:
    blocks: list[Block] = [Heading("Fig. 4 and 5: Grad-CAM of ours")]
    ours = runs_of(runs, PAPER_METHOD)
    candidates = [exp_dir / r.run_dir for r in ours if (exp_dir / r.run_dir / "model.safetensors").is_file()]
    if not candidates:
        reason = "no run of ours" if not ours else "no run of ours kept its model.safetensors / model.json"
        return blocks + [Paragraph(f"Panels skipped: {reason} in `{exp_dir}`.")]
    run_dir = candidates[0]
    try:
        from crosssite.models import load

        model, card = load(run_dir)
        size = int((card.get("preprocessing") or {}).get("image_size", 224))
        stage = finest_stage(model, size)
        where = ("the last convolutional feature map" if stage is None else
                 f"the output of stage {stage + 1} (the last feature map has fewer than 7 x 7 cells at {size} px)")
        blocks.append(
            Paragraph(
                f"Model of `{run_dir.relative_to(exp_dir).as_posix()}`; Grad-CAM of the predicted class on {where}. "
                "Among the run's test slices of each site (its `predictions.csv`), the most confident correct cases "
                "(COVID first) and the most confident failures."
            )
        )
        for pos, site in enumerate(sites):
            name = f"Site {site_letter(pos)} ({site})"
            try:
                correct, failed, n, gap = _gradcam_for_site(model, card, run_dir, site, k)
            except (CrossSiteError, OSError, KeyError, ValueError) as e:
                blocks.append(Paragraph(f"{name}: panels skipped ({e})."))
                continue
            if gap > 1e-3:
                blocks.append(
                    Paragraph(
                        f"{name}: warning, P(COVID) recomputed for the panels differs from the run's predictions.csv "
                        f"by up to {gap:.3f}; the model files or the preprocessing may not be the run's."
                    )
                )
            for cases, what, fig in ((correct, "correct", "Fig. 4"), (failed, "failed", "Fig. 5")):
                if not cases:
                    blocks.append(Paragraph(f"{name}: no {what} case among {n} test slices."))
                    continue
                path = fig_dir / f"gradcam_{what}_site{site_letter(pos)}_{site}.png"
                gradcam_figure(cases, f"{fig}: {what} cases, {name}", path)
                blocks.append(FigureBlock(path, f"{fig}, {name}: {what} cases among {n} test slices."))
    except (CrossSiteError, ImportError, OSError) as e:
        blocks.append(Paragraph(f"Panels skipped: {e}"))
    return blocks


# ------------------------------------------------------------------------------------------------ report
def _with_site_info(exp_dir: Path, run: RunResult) -> RunResult:
    """Fill a run's site order and layouts from its run_dir/sites.json (written by the training engine) when
    results.jsonl does not carry them."""
    if run.site_info and run.site_order:
        return run
    path = exp_dir / run.run_dir / "sites.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["sites"]
        order = tuple(str(e["name"]) for e in entries)
        info = {str(e["name"]): {"layout": e.get("layout")} for e in entries}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return run
    return dataclasses.replace(run, site_order=run.site_order or order, site_info=run.site_info or info)


@dataclass
class ReportOutput:
    """Where the report went."""

    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)


def build_report(
    exp_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    gradcam: bool = True,
    gradcam_cases: int = 4,
    log: Callable[[str], None] = lambda _: None,
) -> ReportOutput:
    """Write `report.md`, `report.html` and `figures/*.png` for the experiment in `exp_dir`.

    Args:
        exp_dir: experiment directory holding `results.jsonl` and the runs' directories.
        out_dir: where to write (default `exp_dir`).
        gradcam: draw the Grad-CAM panels (needs a saved model of ours).
        gradcam_cases: cases per panel.
    """
    exp_dir = Path(exp_dir)
    out = Path(out_dir) if out_dir is not None else exp_dir
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    title = f"crosssite experiment report: {exp_dir.resolve().name}"
    loso = [Heading("Unseen sites: leave one site out"), loso_table(exp_dir / "loso.jsonl")] \
        if (exp_dir / "loso.jsonl").is_file() else []
    if loso and not (exp_dir / "results.jsonl").is_file():  # a leave-one-site-out experiment alone
        return _write_report(out, [Heading(title, 1), *loso], title)
    runs, notes = load_results(exp_dir / "results.jsonl")
    runs = [_with_site_info(exp_dir, r) for r in runs]
    sites = site_order(runs)
    log(f"{len(runs)} runs, sites {', '.join(sites)}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"Generated {stamp} by crosssite {crosssite.__version__} from `results.jsonl` ({len(runs)} runs). "
            "Reproduces the evaluation of Wang, Liu, Dou, \"Contrastive Cross-site Learning with Redesigned Net "
            "for COVID-19 CT Classification\", IEEE JBHI 2020."
        ),
        *_protocol_section(runs, sites),
        Heading("Table I"),
        table_one(runs, sites),
        interval_table(runs, sites),
        Heading("Tables II and III"),
        ttest_table(runs, sites, "baselines"),
        ttest_table(runs, sites, "comparisons"),
        Heading("The paper's claims"),
        verdict_table(runs, sites),
        claims_table(runs, sites),
        Heading("Which row to train"),
        validation_table(runs, sites),
    ]
    log("ROC figures")
    blocks += _roc_section(runs, sites, fig_dir)
    if gradcam:
        log("Grad-CAM panels")
        blocks += _gradcam_section(exp_dir, runs, sites, fig_dir, gradcam_cases)
    else:
        blocks += [Heading("Fig. 4 and 5: Grad-CAM of ours"), Paragraph("Panels skipped: disabled (--no-gradcam).")]
    blocks += loso + _runs_section(runs, notes)
    return _write_report(out, blocks, title)


def _write_report(out: Path, blocks: list[Block], title: str) -> ReportOutput:
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(_to_markdown(blocks, out), encoding="utf-8")
    html_path.write_text(_to_html(blocks, title), encoding="utf-8")
    figures = [b.path for b in blocks if isinstance(b, FigureBlock)]
    return ReportOutput(md_path, html_path, figures)
