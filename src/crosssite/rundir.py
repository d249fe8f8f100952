"""The run-folder format: the files of a run directory, written and read in one place (training, federated
clients, evaluate, experiment and report all go through here). It sits below `crosssite.training` and
`crosssite.reporting`, which both import it, and knows nothing of either.

    config.yaml           the resolved configuration (written by `crosssite.training.config.save_config`)
    sites.json            the sites as given (name, path, layout), so `--resume` needs no --site
    split.json            per site the train / val / test indices and files (crosssite.data.Split)
    log.csv               one row per epoch (`crosssite.training.progress.write_log_csv`)
    checkpoints/last.pt   the full training state (`crosssite.training.checkpoint`)
    model.safetensors     the best model and model.json, its card (`model_card`)
    metrics.json          validation and test metrics of the best model, per site
    predictions.csv       the best model's P(COVID) for every validation and test slice
    skipped.json          unreadable files left out (only with `skip_bad`)

A `single` run holds one such directory per site (``RUN/<site>/``); `read_predictions` reads them all.

A run that fails before it has started leaves nothing behind (`undo_failed_start`): every file and folder the
failed start created is removed again, so the next command sees the folder as it was -- not "already holds a
run", and no ``--resume`` of a run whose ``config.yaml`` was never written. A central run has started once one
of its folders holds ``split.json`` and ``config.yaml`` (written together after the data loaded, right before the
first step: `run_started`); from then on its files are kept, since ``--resume`` continues from them. A federated
run cannot be resumed, so its files are kept only once a client saved its state (`federated_started`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from crosssite.data import CLASS_NAMES, Site, SliceCache, Split, load_sites
from crosssite.errors import ConfigError, CrossSiteError
from crosssite.ioutil import atomic_write_text

__all__ = [
    "CONFIG", "SITES", "SPLIT", "LOG", "CHECKPOINT", "MODEL_STEM", "METRICS", "PREDICTIONS", "SKIPPED",
    "RunDirError", "Prediction", "json_safe", "write_json", "read_json", "site_spec", "write_sites", "read_sites",
    "save_splits", "load_splits", "split_files", "write_run_files", "model_card", "write_predictions",
    "read_predictions", "run_started", "federated_started", "undo_failed_start",
]

CONFIG = "config.yaml"
SITES = "sites.json"
SPLIT = "split.json"
LOG = "log.csv"
CHECKPOINT = Path("checkpoints") / "last.pt"
MODEL_STEM = "model"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
SKIPPED = "skipped.json"
WHOLE = "whole_slices.json"  # slices a canonical frame showed whole for want of a lung field
PREDICTION_COLUMNS = ["site", "path", "frame", "patient", "label", "p_covid", "part"]


class RunDirError(CrossSiteError):
    """A run directory whose files are missing or unreadable."""


class Prediction(NamedTuple):
    """One row of ``predictions.csv``."""

    site: str
    path: Path
    frame: int | None
    patient: str | None
    label: int
    p_covid: float
    part: str


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON null), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing or corrupt file is a `RunDirError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RunDirError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e.msg})") from None


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """``predictions.csv``: one row per slice (site, path, frame, patient, label, P(COVID) at full precision,
    part)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        frame = "" if row["frame"] is None else row["frame"]
        patient = "" if row.get("patient") is None else row["patient"]
        writer.writerow({**row, "frame": frame, "patient": patient, "p_covid": repr(float(row["p_covid"]))})
    atomic_write_text(path, buffer.getvalue())


def read_predictions(run_dir: Path, part: str | None = None) -> list[Prediction]:
    """Every row of the run's ``predictions.csv`` files (one per site for `single`), of ``part`` if given."""
    out = []
    for path in sorted(Path(run_dir).rglob(PREDICTIONS)):
        with open(path, newline="", encoding="utf-8") as fh:
            for number, rec in enumerate(csv.DictReader(fh), 2):
                if part is not None and rec.get("part", "test") != part:
                    continue
                try:
                    out.append(Prediction(rec["site"], Path(rec["path"]), int(rec["frame"]) if rec.get("frame") else None,
                                          rec.get("patient") or None, int(rec["label"]), float(rec["p_covid"]),
                                          rec.get("part", "test")))
                except (KeyError, ValueError) as e:
                    raise RunDirError(f"{path}:{number}: needs site, path, frame, label and p_covid ({e})") from None
    return out


def write_json(path: Path, data: dict[str, Any] | list[Any]) -> None:
    """``data`` as indented JSON (non-finite floats as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2) + "\n")


def site_spec(site: Site) -> dict[str, str | None]:
    """``{"name", "path", "layout"}`` from which `crosssite.data.load_site` reloads ``site`` (``sites.json``)."""
    if site.layout == "synthetic":
        options = ",".join(f"{k}={v}" for k, v in sorted(site.params.items()))
        return {"name": site.name, "path": f"synthetic:{options}", "layout": "synthetic"}
    if site.layout == "simulated":
        return {"name": site.name, "path": str(site.params["spec"]), "layout": "simulated"}
    return {"name": site.name, "path": str(site.root), "layout": site.layout}


def write_sites(out_dir: Path, sites: list[Site]) -> None:
    """``sites.json``: how to reload every site of the run."""
    write_json(Path(out_dir) / SITES, {"sites": [site_spec(site) for site in sites]})


def read_sites(out_dir: str | Path) -> list[Site]:
    """The sites a run in ``out_dir`` was trained on, reloaded from its ``sites.json``."""
    path = Path(out_dir) / SITES
    if not path.is_file():
        raise RunDirError(f"{path}: not found; give the sites with --site")
    entries = read_json(path)["sites"]
    return load_sites([(e["name"], e["path"], e["layout"]) for e in entries])


def save_splits(path: Path, sites: list[Site], splits: list[Split]) -> None:
    """``split.json``: per site (by name) the indices, paths and frames of each part."""
    data = {"sites": [split.to_json(site) for site, split in zip(sites, splits)]}
    atomic_write_text(path, json.dumps(data, indent=1))


def load_splits(path: Path, sites: list[Site]) -> list[Split]:
    """Splits saved by `save_splits`, checked against the sites' current files."""
    by_name = {entry["site"]: entry for entry in read_json(path)["sites"]}
    missing = [s.name for s in sites if s.name not in by_name]
    if missing or len(by_name) != len(sites):
        raise ConfigError(f"{path}: saved sites {sorted(by_name)} do not match the given sites "
                          f"{[s.name for s in sites]}")
    return [Split.from_json(by_name[site.name], site) for site in sites]


def split_files(run_dir: Path, site: str, part: str) -> list[tuple[str, int | None]]:
    """(path, frame) of every file of ``site``'s ``part`` in the run's ``split.json``."""
    path = Path(run_dir) / SPLIT
    try:
        entries = {e["site"]: e for e in read_json(path)["sites"]}
        files = entries[site][part]
        return list(zip(files["paths"], files.get("frames") or [None] * len(files["paths"])))
    except (KeyError, TypeError) as e:
        raise RunDirError(f"{path}: no readable {part} part for site {site!r} ({e})") from None


def write_run_files(out_dir: Path, sites: list[Site], splits: list[Split], cache: SliceCache, *, new_split: bool,
                    prefix: str = "") -> None:
    """Write ``split.json`` when the split was just made, ``skipped.json`` when unreadable files were left out of
    the run (``cache.skipped``), and ``whole_slices.json`` when a canonical frame found no lung field in some
    slices and shows them whole; each of the last two is said on stdout, each line starting with ``prefix``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if new_split:
        save_splits(out_dir / SPLIT, sites, splits)
    if cache.skipped:
        count = cache.write_skipped(out_dir / SKIPPED)
        print(f"{prefix}skipped {count} unreadable file(s), listed in {out_dir / SKIPPED}")
    whole = cache.whole_samples()
    if whole:
        write_json(out_dir / WHOLE, [{"path": str(s.path), "frame": s.frame} for s in whole])
        shown = set(whole)
        where = ", ".join(f"{site.name} {n}" for site in sites if (n := sum(s in shown for s in site.samples)))
        print(f"{prefix}no lung field found in {len(whole)} of {len(cache)} slice(s) ({where}): shown whole, listed in "
              f"{out_dir / WHOLE}")


_NORM_TEXT = {"train": "pixel mean / std of the run's training part", "fixed": "fixed constants, the same for any run"}
_FRAME_TEXT = {
    "resize": "whole slice resized to a square",
    "pad": "whole slice padded to a square (median border grey), then resized",
    "crop": "short side to image_size, central square",
    "canonical": "lung field in canonical greys (crosssite.data.canonical), padded to a square, then resized",
    "canonical-aerated": "lung field in canonical greys anchored on aerated lung (crosssite.data.canonical), padded "
                         "to a square, then resized",
    "canonical-lungs": "lung fields and their rim in canonical greys anchored on aerated lung "
                       "(crosssite.data.canonical), padded to a square, then resized",
    "canonical-equalised": "lung field with the body's greys histogram-equalised (crosssite.data.canonical), padded "
                           "to a square, then resized",
}


def model_card(
    train_config: dict[str, Any], site_names: list[str], method: str, metrics: dict[str, Any],
    mean: Sequence[float], std: Sequence[float],
) -> dict[str, Any]:
    """The card saved beside a trained model: what `crosssite evaluate` / `predict` / `export` need to use it
    (sites, classes, preprocessing with the run's own normalisation ``mean`` / ``std``, threshold) and how it was
    made (the resolved configuration ``train_config``, method, selection metrics)."""
    return {
        "site_names": list(site_names),
        "class_names": list(CLASS_NAMES),
        "preprocessing": {"image_size": train_config["image_size"], "frame": train_config["frame"], "mean": list(mean),
                          "std": list(std), "normalisation": _NORM_TEXT[train_config["input_norm"]],
                          "eval_resize": _FRAME_TEXT[train_config["frame"]]},
        "train_config": dict(train_config),
        "method": method,
        "tta": train_config["tta"],
        "threshold": 0.5,
        "metrics": json_safe(metrics),
    }


def _entries(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def run_started(out_dir: Path) -> bool:
    """Whether ``out_dir`` (or a per-site folder in it) holds a run whose training loop began."""
    folders = [out_dir, *(p for p in out_dir.iterdir() if p.is_dir())] if out_dir.is_dir() else []
    return any((f / SPLIT).is_file() and (f / CONFIG).is_file() for f in folders)


def federated_started(out_dir: Path) -> bool:
    """Whether a client of the federated run in ``out_dir`` saved its state after a round."""
    return out_dir.is_dir() and any(p.is_file() for p in out_dir.glob("*/state.pt"))


@contextlib.contextmanager
def undo_failed_start(out_dir: os.PathLike | str, started: Callable[[Path], bool] = run_started) -> Iterator[None]:
    """Remove what the block created in ``out_dir`` if it raises while ``started(out_dir)`` is false.

    Only the main process (``RANK`` 0 or unset) removes anything; files that existed before are never touched.
    """
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    before = _entries(out_dir)
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", 0)) == 0 and not started(out_dir):
            if not existed:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                for path in sorted(_entries(out_dir) - before, key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        raise
