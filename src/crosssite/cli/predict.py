"""``crosssite predict`` (a trained model on new files) and ``crosssite export`` (ONNX).

    crosssite predict MODEL INPUT... [--site NAME | --adapt | --adapt-strategy NAME
                      [--save-adapted NEW_MODEL --adapt-name NAME]]
                      [--cam DIR] [--out FILE.csv|FILE.json] [--batch-size N] [--top-k K] [--strict]
    crosssite export MODEL --onnx FILE [--site NAME] [--int8 --calibrate PATH... [--calibration-slices N]]

MODEL is a crosssite model (stem, ``.safetensors``, ``.json`` or run folder) or, for ``predict``, an
``.onnx`` export. INPUT is an image, DICOM or NIfTI file, or a folder searched recursively (a folder of
DICOM files is one series). Unreadable inputs are reported by path and the rest still run; the exit status
is 1 when any input failed (after the good rows are written). A file that may not be a chest-CT slice (a DICOM
whose Modality is not CT, a localizer or non-axial slice, an image below the minimum size) is predicted with a
``warning`` in its row and one line on stderr, or refused with ``--strict``. Bad requests and unwritable outputs
give a one-line message and exit status 1.

``--adapt`` is AdaBN; ``--adapt-strategy adabn|standardise|tent|ensemble`` picks a test-time strategy
(`crosssite.inference.predictor`; it implies ``--adapt``; click has no option whose value may be left out without
prompting, so the bare flag stays AdaBN). Every slice
and volume row carries ``ood_score`` and ``ood`` (far from every training site), and one warning line says how
many were flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from crosssite.cli.app import app, fail, one_line
from crosssite.errors import CrossSiteError
from crosssite.ioutil import ensure_dir

MAX_TABLE_ROWS = 40
"""Longer outputs are summarised on the terminal (every row goes to ``--out``)."""



def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _fmt_p(p: float | None) -> str:
    return "" if p is None else f"{p:.4f}"


def _print_records(records: list[Any], header: str) -> None:
    from rich.table import Table

    console = _console()
    console.print(header, markup=False)
    slices = [r for r in records if r.kind == "slice"]
    volumes = [r for r in records if r.kind == "volume"]
    if len(slices) <= MAX_TABLE_ROWS:
        table = Table(title="slices", title_justify="left")
        for column, justify in (("path", "left"), ("frame", "right"), ("P(COVID)", "right"), ("label", "left")):
            table.add_column(column, justify=justify)
        for r in slices:
            table.add_row(r.path, "" if r.frame is None else str(r.frame), _fmt_p(r.p_covid), r.label)
        console.print(table)
    else:
        counts: dict[str, int] = {}
        for r in slices:
            counts[r.label] = counts.get(r.label, 0) + 1
        shown = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
        console.print(f"{len(slices)} slices: {shown} (use --out FILE.csv for every row)", markup=False)
    if volumes:
        table = Table(title="volumes (mean of the top-k slice probabilities)", title_justify="left")
        for column, justify in (("path", "left"), ("slices", "right"), ("k", "right"), ("score", "right"),
                                ("label", "left")):
            table.add_column(column, justify=justify)
        for r in volumes[:MAX_TABLE_ROWS]:
            table.add_row(r.path, str(r.n_slices), str(r.top_k), _fmt_p(r.p_covid), r.label)
        console.print(table)
        if len(volumes) > MAX_TABLE_ROWS:
            console.print(f"... {len(volumes) - MAX_TABLE_ROWS} more volumes (use --out)", markup=False)


def _report_ood(records: list[Any], threshold: float) -> None:
    """One warning line when slices or volumes sit far from every training site."""
    scans = [r for r in records if r.kind == "volume"] + [r for r in records if r.kind == "slice" and r.volume is None]
    flagged = [r for r in scans if r.ood]
    if flagged:
        typer.echo(f"warning: {len(flagged)} of {len(scans)} scan(s) lie far from every training site (ood_score > "
                   f"{threshold:g}, e.g. {flagged[0].path}); predictions there may be unreliable, consider --adapt",
                   err=True)


def _report_problems(records: list[Any]) -> None:
    from crosssite.data.transforms import WHOLE_SLICE

    skipped = [r for r in records if r.kind == "skipped"]
    if skipped:
        typer.echo(f"skipped {len(skipped)} file(s) that are not images, e.g. {skipped[0].path}", err=True)
    warned: dict[str, str] = {}
    whole = []  # slices the canonical view showed whole: one line for all, and --strict does not refuse them
    for r in records:
        if r.kind == "error":
            typer.echo(f"error: {r.path}: {one_line(r.error)}", err=True)
            continue
        notes = r.warning.split("; ") if r.warning else []
        if WHOLE_SLICE in notes:
            whole.append(r)
            notes.remove(WHOLE_SLICE)
        if notes and r.path not in warned:
            warned[r.path] = "; ".join(notes)
            typer.echo(f"warning: {r.path}: {one_line(warned[r.path])}", err=True)
    if warned:
        typer.echo(f"{len(warned)} file(s) predicted with a warning (--strict refuses them)", err=True)
    if whole:
        n = sum(r.kind == "slice" for r in records)
        typer.echo(f"note: no lung field found in {len(whole)} of {n} slice(s) (e.g. {whole[0].path}): the model saw "
                   "the whole slice there, not the canonical lung view it was trained on", err=True)


def is_model_path(path: Path) -> bool:
    """Whether ``path`` names a model: a .safetensors / .json / .onnx file, a stem with a .safetensors beside it,
    or a run folder holding model.safetensors."""
    if path.suffix.lower() in (".safetensors", ".onnx") or (path.suffix.lower() == ".json" and
                                                            path.with_suffix(".safetensors").is_file()):
        return True
    if path.is_dir():
        return (path / "model.safetensors").is_file()
    return not path.exists() and path.with_suffix(".safetensors").is_file()


def split_model_argument(paths: list[Path]) -> tuple[Path, list[Path]]:
    """``[MODEL] INPUT...`` -> (model, inputs): the first path when it names a model and inputs follow, else the
    shipped model (`crosssite.pretrained`) and every path as an input."""
    from crosssite.pretrained import shipped_model

    if len(paths) > 1 and is_model_path(paths[0]):
        return paths[0], paths[1:]
    if len(paths) == 1 and is_model_path(paths[0]):
        raise CrossSiteError(f"{paths[0]}: a model but no inputs; give image files or folders after it")
    return shipped_model(), paths


def _strategy(adapt_flag: bool, strategy: str | None, site: str | None, save_adapted: Path | None) -> str | None:
    """The test-time strategy ``--adapt`` / ``--adapt-strategy`` ask for, checked against the other options."""
    from crosssite.models.adaptation import DEFAULT_STRATEGY, MEAN_OF_SITES, STRATEGIES, adaptation_strategies

    if strategy is not None and strategy not in (*STRATEGIES, "none"):
        raise CrossSiteError(f"--adapt-strategy: unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(adaptation_strategies())} or none")
    if strategy in ("none", MEAN_OF_SITES):  # the mean of the known sites' statistics, nothing adapted
        adapt = None
    elif strategy is not None:
        adapt = strategy
    elif save_adapted is not None:  # saving an adapted model needs a new slot: AdaBN
        adapt = "adabn"
    else:  # an unseen site by default: the strategy with the best leave-one-site-out AUC
        adapt = DEFAULT_STRATEGY if adapt_flag or site is None else None
    if site is not None and adapt:
        raise CrossSiteError("--site and --adapt exclude each other: choose one normalisation")
    if save_adapted is not None and not adapt:
        raise CrossSiteError("--save-adapted needs --adapt")
    if save_adapted is not None and not STRATEGIES[adapt].fits:
        raise CrossSiteError(f"--save-adapted needs AdaBN or TENT, a strategy that adds a site "
                             f"(--adapt-strategy {adapt} adds none)")
    return adapt


def _show(predictor: Any, model: Path, records: list[Any], out: Path | None) -> None:
    """The rows as a table on the terminal, or written to ``out`` (.csv / .json) with what produced them."""
    from crosssite.inference import write_records

    header = f"model {model}: normalisation {predictor.norm}, threshold {predictor.threshold:g}"
    if predictor.tta != "none":
        header += f", test-time augmentation {predictor.tta}"
    if out is None:
        _print_records(records, header)
        return
    meta = {"model": str(model), "norm": predictor.norm, "threshold": predictor.threshold, "tta": predictor.tta,
            "top_k": predictor.top_k, "class_names": list(predictor.class_names),
            "ood_threshold": predictor.ood_threshold}
    write_records(out, records, meta)
    typer.echo(f"{header}; wrote {len(records)} rows to {out}", err=True)


def _check_outputs(out: Path | None, cam: Path | None) -> None:
    """Before any work, so that a bad output path fails at once."""
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise CrossSiteError(f"{out}: --out must end in .csv or .json")
    for folder, what in ((None if out is None else out.parent, "--out"), (cam, "--cam")):
        if folder is not None:
            ensure_dir(folder, f"the {what} folder")


def _say_adapted(predictor: Any, save_adapted: Path | None, adapt_name: str) -> None:
    """What adaptation did, on stderr, and the adapted model written where asked."""
    if predictor.adapted is not None:
        typer.echo(f"{predictor.adapted_with}: normalisation re-estimated on {predictor.adapted[1]} images", err=True)
    if save_adapted is not None:
        weights, _ = predictor.save_adapted(save_adapted, adapt_name)
        typer.echo(f"saved the adapted model (new site {adapt_name!r}) to {weights}", err=True)


@app.command()
def predict(
    paths: list[Path] = typer.Argument(None, metavar="[MODEL] INPUT...", help="Optional model file (stem, "
                                       ".safetensors, .json, run folder) or .onnx export, then image / DICOM / NIfTI "
                                       "files or folders (recursive). Without a model: the shipped one."),
    site: str | None = typer.Option(None, "--site", help="Normalise with this known site's statistics."),
    adapt_flag: bool = typer.Option(False, "--adapt", help="Adapt to the inputs' site with the default strategy "
                                    "(standardise; it is also what runs without --site or --adapt-strategy)."),
    strategy: str | None = typer.Option(
        None, "--adapt-strategy", metavar="NAME",
        help="Test-time strategy for an unseen site: standardise (the default: each slice to the training pixel "
             "mean/std), adabn (re-estimate the normalisation on the inputs), tent (AdaBN + entropy "
             "minimisation), ensemble (mean over the sites' BN), none (the mean of the sites' statistics).",
    ),
    save_adapted: Path | None = typer.Option(None, "--save-adapted",
                                             help="Write the adapted model (with --adapt, or --adapt-strategy tent)."),
    adapt_name: str = typer.Option("adapted", "--adapt-name", help="Site name of the adapted slot."),
    cam: Path | None = typer.Option(None, "--cam", help="Write a Grad-CAM overlay PNG per slice into this folder."),
    out: Path | None = typer.Option(None, "--out", help="Write every row to FILE.csv or FILE.json."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per forward pass."),
    top_k: int = typer.Option(5, "--top-k", min=0, help="Slices averaged into a volume's score (0: all)."),
    tta: str | None = typer.Option(None, "--tta", metavar="MODE",
                                   help="Test-time augmentation: none, or flip (average each slice with its "
                                        "left-right mirror). Default: the model's own (its card's tta)."),
    dicomweb: str | None = typer.Option(None, "--dicomweb", metavar="URL", help="Score --study UID there (DICOMweb)."),
    study: str | None = typer.Option(None, "--study", metavar="UID"),
    dry_run: Path | None = typer.Option(None, "--dry-run", metavar="DIR"),
    strict: bool = typer.Option(False, "--strict", help="Refuse inputs that would be predicted with a warning "
                                "(DICOM not CT, localizer or non-axial slice, image below the minimum size)."),
    draft_jpeg: bool = typer.Option(False, "--draft-jpeg", help="Decode JPEGs much larger than the model input at a "
                                    "reduced scale: faster, but P(COVID) moves (docs/PERFORMANCE.md); default: in "
                                    "full, as evaluate does."),
) -> None:
    """Predict P(COVID) for slices, DICOM series and NIfTI volumes, with per-volume scores."""
    from crosssite.inference import Predictor, failed

    if dicomweb or study or not paths:  # a study of a DICOMweb server instead of files
        from crosssite.cli.dicom_node import predict_dicomweb
        return predict_dicomweb(paths, dicomweb, study, site=site, strategy=strategy, dry_run=dry_run)
    try:
        model, inputs = split_model_argument(paths)
        adapt = _strategy(adapt_flag, strategy, site, save_adapted)
        _check_outputs(out, cam)
        predictor = Predictor.from_file(model, site=site, adapt=adapt, batch_size=batch_size, top_k=top_k or None,
                                        strict=strict, tta=tta, draft=draft_jpeg)
        records = predictor.predict(inputs, cam_dir=cam)
        _say_adapted(predictor, save_adapted, adapt_name)
        _show(predictor, model, records, out)
    except CrossSiteError as e:
        raise fail(e) from None
    _report_problems(records)
    _report_ood(records, predictor.ood_threshold)
    if failed(records):
        raise typer.Exit(1)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model file (stem, .safetensors, .json or run folder)."),
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write."),
    site: str | None = typer.Option(None, "--site", help="Bake in this known site's normalisation (default: mean)."),
    int8: bool = typer.Option(False, "--int8", help="Quantise to int8 (static; needs --calibrate)."),
    calibrate: list[Path] = typer.Option(
        [], "--calibrate", help="Images of the export's site (files or folders) to calibrate int8 ranges on; repeatable."
    ),
    calibration_slices: int = typer.Option(256, "--calibration-slices", help="At most this many slices, spread evenly."),
) -> None:
    """Export a model to ONNX (dynamic batch; normalisation fixed at export; preprocessing in its metadata)."""
    from crosssite.inference import export_int8, export_onnx
    from crosssite.inference.export import max_difference

    if calibrate and not int8:
        raise fail("--calibrate is for --int8 exports; add --int8 or drop --calibrate")
    if int8 and not calibrate:
        raise fail("--int8 needs calibration images: --calibrate PATH (slices of the site the export is for)")
    try:
        if not int8:
            path = export_onnx(model, onnx, site)
            diff = max_difference(model, path, site)
            typer.echo(f"wrote {path} (max |P difference| to PyTorch on random inputs: {diff:.2e})")
            return
        typer.echo(f"exporting, then calibrating int8 ranges on up to {calibration_slices} slices ...", err=True)
        done = export_int8(model, onnx, calibrate, site, max_slices=calibration_slices)
    except CrossSiteError as e:
        raise fail(e) from None
    if done.errors:
        shown = "; ".join(str(e) for e in done.errors[:3])
        more = f" (and {len(done.errors) - 3} more)" if len(done.errors) > 3 else ""
        typer.echo(f"calibration skipped {len(done.errors)} unreadable input(s): {shown}{more}", err=True)
    typer.echo(f"wrote {done.path} (int8, calibrated on {done.calibration_slices} slices; |P difference| to PyTorch "
               f"on them: mean {done.mean_abs_p_diff:.2e}, max {done.max_abs_p_diff:.2e})")
