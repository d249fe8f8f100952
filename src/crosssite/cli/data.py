"""``crosssite data ...``: commands that inspect sites.

    crosssite data check SITE... [--json] [--allow-unreadable] [--strict] [--split RUN/split.json]

SITE is ``NAME=PATH[:LAYOUT]`` (``NAME=synthetic[:shift=0.5,n=200,seed=0,size=256]`` for a built-in
synthetic site). Bad input (missing path, unknown layout, empty site...) gives a one-line message on stderr
and exit status 1; so does a check that found unreadable files (unless ``--allow-unreadable``), and with
``--strict`` one that found DICOM files that may not be chest-CT slices (MR, RT dose, localizers...).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError

data_app = typer.Typer(no_args_is_help=True, help="Inspect sites: classes, patients, formats, bad files, duplicates.")
app.add_typer(data_app, name="data")



def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from crosssite.data.groups import NEAR_DUPLICATE_BITS
    from crosssite.data.io import MIN_IMAGE_SIDE

    table = Table(title="sites")
    for column in ("site", "layout", "COVID", "non-COVID", "patients", "formats", "modes", "width", "height",
                   "unreadable", "duplicates"):
        table.add_column(column)
    for s in report["sites"]:
        table.add_row(
            s["name"], s["layout"], str(s["classes"]["COVID"]), str(s["classes"]["non-COVID"]),
            "-" if s["patients"] is None else str(s["patients"]),
            ", ".join(f"{k} {v}" for k, v in s["formats"].items()),
            ", ".join(f"{k} {v}" for k, v in s["modes"].items()),
            "{}-{}".format(*s["width"]), "{}-{}".format(*s["height"]),
            str(len(s["unreadable"])), str(s["duplicates"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a file: do not squeeze the table to 80 columns
    console.print(table)
    for s in report["sites"]:
        for attribute in ("formats", "modes"):
            per_class = "; ".join(f"{cls}: " + ", ".join(f"{k} {v}" for k, v in values.items())
                                  for cls, values in s[f"{attribute}_per_class"].items())
            console.print(f"{attribute} per class in {s['name']}: {per_class}", markup=False)
        for cut in s["shortcuts"]:
            console.print(
                f"warning: in {s['name']}, {cut['attribute']} {cut['value']} occurs only in class {cut['class']} "
                f"({cut['count']} slices, {100 * cut['fraction']:.1f}% of the site): a model can tell the classes "
                "apart by the file instead of the lungs", markup=False)
        for e in s["errors"]:
            console.print(f"unreadable in {s['name']}: {e['path']}: {e['reason']}", markup=False)
        for group in s["duplicate_groups"]:
            console.print(f"identical slices in {s['name']}: {' = '.join(group)}", markup=False)
        groups = s["groups"]
        console.print(f"near-duplicate pairs in {s['name']}: {s['near_duplicates']} (at most {NEAR_DUPLICATE_BITS} of "
                      f"256 hash bits apart); splits group its slices by {groups['by']}: {groups['count']} groups, "
                      f"the largest {groups['largest']} slices", markup=False)
        for pair, n in s.get("split_near_duplicates", {}).items():
            console.print(f"near-duplicate pairs between the split's {pair} parts in {s['name']}: {n}"
                          + (" (the split leaks: a slice is tested while its twin is trained on)"
                             if n and "test" in pair else ""), markup=False)
    for group in report["cross_site_duplicates"]:
        console.print("identical slices across sites: " + " = ".join(f"{o['site']}:{o['path']}" for o in group),
                      markup=False)
    for s in report["sites"]:
        if s["too_small"]:
            console.print(f"too small to train on in {s['name']}: {len(s['too_small'])} image(s) below "
                          f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} pixels, e.g. {s['too_small'][0]}", markup=False)
        if s.get("ignored"):
            console.print(f"ignored on purpose in {s['name']}: {len(s['ignored'])} hidden or system file(s) (names "
                          f"starting with '.', Thumbs.db, desktop.ini), e.g. {s['ignored'][0]}", markup=False)


def not_ct_lines(site_name: str, found: list[dict[str, str]], shown: int = 5) -> list[str]:
    """Warning lines naming a site's DICOM files that may not be chest-CT slices, and how many there are."""
    if not found:
        return []
    lines = [f"warning: in {site_name}, {len(found)} DICOM file(s) may not be chest-CT slices; training would use "
             "them as CT (--strict refuses them):"]
    lines += [f"  {f['path']}: {f['warning']}" for f in found[:shown]]
    if len(found) > shown:
        lines.append(f"  ... and {len(found) - shown} more (--json lists every one)")
    return lines


def _add_ignored(report: dict, sites: list) -> None:
    """Each site's hidden and system files (skipped on purpose) as ``ignored`` in its report."""
    from crosssite.data.sites import ignored_files

    for entry, site in zip(report["sites"], sites):
        walked = site.layout in ("folder", "sars_cov2_ct", "covid_ct") and Path(site.root).is_dir()
        entry["ignored"] = [str(p) for p in ignored_files(site.root)] if walked else []


def _read_split(path: Path) -> dict:
    """A run's ``split.json``; a missing or malformed file is one named line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise fail(f"{path}: cannot read the split file ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise fail(f"{path}: not a run's split.json (invalid JSON: {e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
        raise fail(f"{path}: not a run's split.json (no 'sites' list)")
    return data


@data_app.command("check")
def check(
    sites: list[str] = typer.Argument(..., metavar="SITE...", help="NAME=PATH[:LAYOUT], one or more."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    allow_unreadable: bool = typer.Option(
        False, "--allow-unreadable", help="Exit 0 even when files are unreadable (they are still listed)."
    ),
    split: Path | None = typer.Option(
        None, "--split", help="A run's split.json: count the near-duplicate slices between its parts."
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a DICOM file may not be a chest-CT slice "
                                "(Modality MR, RT dose, ..., a localizer or non-axial slice)."),
) -> None:
    """Count classes and patients, list formats, modes, sizes, unreadable files and duplicate images.

    Exits with status 1 when any file is unreadable or below the minimum size training accepts (after the full
    report), unless ``--allow-unreadable``.
    Hidden and system files (``.DS_Store``...) are ignored on purpose and listed as such.
    """
    from crosssite.data import load_sites
    from crosssite.data.check import check_sites

    try:
        loaded = load_sites(sites)
        report = check_sites(loaded, splits=_read_split(split) if split is not None else None)
    except CrossSiteError as e:
        raise fail(e) from None
    _add_ignored(report, loaded)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print_report(report)
        for s in report["sites"]:
            for line in not_ct_lines(s["name"], s["not_ct"]):
                typer.echo(line, err=True)
    not_ct = {s["name"]: len(s["not_ct"]) for s in report["sites"] if s["not_ct"]}
    if strict and not_ct:
        shown = ", ".join(f"{n} in {name}" for name, n in not_ct.items())
        raise fail(f"--strict: {sum(not_ct.values())} DICOM file(s) may not be chest-CT slices ({shown}), listed "
                   "above; remove them from the sites")
    bad = {s["name"]: len(s["unreadable"]) + len(s["too_small"]) for s in report["sites"]
           if s["unreadable"] or s["too_small"]}
    if bad and not allow_unreadable:
        shown = ", ".join(f"{n} in {name}" for name, n in bad.items())
        raise fail(f"{sum(bad.values())} unreadable or too small file(s) ({shown}), listed above; fix or remove "
                   "them, or pass --allow-unreadable (training skips them with --skip-bad)")
