"""``crosssite dicom-node`` (a DICOM node that scores the CT series a PACS sends it) and the DICOMweb path of
``crosssite predict --dicomweb URL --study UID``.

    crosssite dicom-node [MODEL] [--ae-title CROSSSITE] [--host 127.0.0.1] [--port 11112]
                         (--send-to HOST:PORT:AET | --dicomweb URL | --dry-run DIR)
                         [--complete-after 5] [--rules RULES.yaml] [--spool DIR] [--site NAME | --adapt-strategy NAME]
                         [--cam-top K]

Each series is scored as ``crosssite predict`` scores a folder of its files (same `Predictor`, same defaults: an
unseen site, each slice standardised), and its result goes back as a DICOM Comprehensive SR in the source study
(`crosssite.pacs`). The log (stderr) has one health line per series and never a patient attribute or pixel.
Needs ``pip install 'crosssite[pacs]'``.
"""

from __future__ import annotations

import logging
import signal
import warnings
import threading
from pathlib import Path
from typing import Any

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging() -> None:
    """crosssite's PACS log on stderr at INFO; the network and SR libraries' own chatter at WARNING. pydicom's
    warnings quote element values (a malformed patient name, say), so they stay out of the log."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("crosssite.pacs").setLevel(logging.INFO)
    for name in ("pynetdicom", "highdicom", "dicomweb_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def _require_pacs() -> None:
    try:
        import dicomweb_client  # noqa: F401
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as e:
        raise CrossSiteError(f"the PACS features need pynetdicom, highdicom and dicomweb-client ({e.name} is "
                             "missing): pip install 'crosssite[pacs]'") from None


def _predictor(model: Path | None, site: str | None, strategy: str | None) -> Any:
    """The `Predictor` with ``crosssite predict``'s defaults (no site: an unseen one, `DEFAULT_STRATEGY`)."""
    from crosssite.inference import STRATEGIES, Predictor
    from crosssite.models.adaptation import DEFAULT_STRATEGY
    from crosssite.pretrained import shipped_model

    if strategy is not None and strategy not in (*STRATEGIES, "none"):
        raise CrossSiteError(f"--adapt-strategy: unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)} or none")
    if site is not None and strategy not in (None, "none"):
        raise CrossSiteError("--site and --adapt-strategy exclude each other: choose one normalisation")
    adapt = None if strategy == "none" or site is not None else (strategy or DEFAULT_STRATEGY)
    return Predictor.from_file(model or shipped_model(), site=site, adapt=adapt)


def _sender(send_to: str | None, dicomweb: str | None, dry_run: Path | None, ae_title: str) -> Any:
    from crosssite.pacs.delivery import CStoreSender, FolderSender, StowSender, parse_peer

    chosen = [o for o, v in (("--send-to", send_to), ("--dicomweb", dicomweb), ("--dry-run", dry_run)) if v]
    if len(chosen) != 1:
        raise CrossSiteError("choose where results go: exactly one of --send-to HOST:PORT:AET, --dicomweb URL "
                             f"or --dry-run DIR (got {', '.join(chosen) or 'none'})")
    if dry_run is not None:
        return FolderSender(dry_run)
    if dicomweb is not None:
        return StowSender(dicomweb.rstrip("/"))
    host, port, aet = parse_peer(send_to)
    return CStoreSender(host, port, aet, calling_ae_title=ae_title)


def build_pipeline(model: Path | None, sender: Any, *, rules: Path | None, spool: Path | None, site: str | None,
                   strategy: str | None, name: str, cam_top: int = 0) -> Any:
    """The `Pipeline` behind the node and the DICOMweb path; spool and outbox under ``spool`` (default
    ``$CROSSSITE_CACHE/pacs/NAME``)."""
    from crosssite.ioutil import cache_root
    from crosssite.pacs.delivery import Outbox
    from crosssite.pacs.pipeline import Pipeline
    from crosssite.pacs.rules import load_rules

    rules_ = load_rules(rules)
    root = spool or cache_root() / "pacs" / name
    predictor = _predictor(model, site, strategy)
    return Pipeline(predictor, rules_, root / "incoming", Outbox(root / "outbox", sender), cam_top=cam_top)


@app.command("dicom-node")
def dicom_node(
    model: Path | None = typer.Argument(None, help="Model file (stem, .safetensors, .json, run folder) or .onnx "
                                        "export. Default: the shipped model."),
    ae_title: str = typer.Option("CROSSSITE", "--ae-title", help="This node's AE title."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(11112, "--port", min=0, max=65535, help="DICOM port to listen on."),
    send_to: str | None = typer.Option(None, "--send-to", metavar="HOST:PORT:AET",
                                       help="Send each SR by C-STORE to this peer (usually the PACS that sent)."),
    dicomweb: str | None = typer.Option(None, "--dicomweb", metavar="URL",
                                        help="Send each SR by STOW-RS to this DICOMweb root instead."),
    dry_run: Path | None = typer.Option(None, "--dry-run", metavar="DIR",
                                        help="Write each SR into DIR/<StudyInstanceUID>/ instead of sending it."),
    complete_after: float = typer.Option(5.0, "--complete-after", min=0.0,
                                         help="Seconds without a new instance after which a series is complete."),
    rules: Path | None = typer.Option(None, "--rules", help="Selection rules (YAML; default: CT, axial, no "
                                      "localizers, slice thickness 0.5-10 mm)."),
    spool: Path | None = typer.Option(None, "--spool", help="Folder for received series and the outbox "
                                      "(default $CROSSSITE_CACHE/pacs/AE_TITLE)."),
    site: str | None = typer.Option(None, "--site", help="Normalise with this known site's statistics."),
    strategy: str | None = typer.Option(None, "--adapt-strategy", metavar="NAME",
                                        help="Test-time strategy for an unseen site, as for predict (default "
                                             "standardise)."),
    cam_top: int = typer.Option(0, "--cam-top", min=0, metavar="K",
                                help="Also send a Secondary Capture series with the Grad-CAM overlays of the K "
                                     "slices of highest P(COVID) (0: none; needs a crosssite model file)."),
) -> None:
    """Run a DICOM node: receive CT series (C-STORE), score each, send a DICOM SR back into the study."""
    from crosssite.pacs.node import DicomNode

    setup_logging()
    try:
        _require_pacs()
        sender = _sender(send_to, dicomweb, dry_run, ae_title)
        pipeline = build_pipeline(model, sender, rules=rules, spool=spool, site=site, strategy=strategy,
                                  name=ae_title, cam_top=cam_top)
        node = DicomNode(pipeline, ae_title=ae_title, host=host, port=port, complete_after_s=complete_after)
        node.start()
    except CrossSiteError as e:
        raise fail(e) from None
    except OSError as e:  # the port is taken or not ours to bind
        raise fail(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    typer.echo(f"DICOM node {ae_title} on {host}:{node.port}; results to {sender.description}; Ctrl-C stops",
               err=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    node.stop()
    left = pipeline.outbox.pending()
    if left:
        typer.echo(f"{len(left)} result(s) not yet delivered stay in {pipeline.outbox.folder} (sent at the next "
                   "start)", err=True)


def predict_dicomweb(paths: list[Path] | None, url: str | None, study: str | None, *, site: str | None,
                     strategy: str | None, dry_run: Path | None) -> None:
    """``crosssite predict [MODEL] --dicomweb URL --study UID [--dry-run DIR]``: pull the study (QIDO-RS / WADO-RS),
    score each series, STOW-RS the reports back (or write them under ``dry_run``), print one line per series."""
    if not paths and not (url or study):
        raise fail("give image files or folders to predict (or --dicomweb URL --study UID)")
    if not (url and study) or len(paths or []) > 1:
        raise fail("--dicomweb URL and --study UID go together, with at most a MODEL before them")
    try:
        _predict_dicomweb((paths or [None])[0], url, study, site=site, strategy=strategy, dry_run=dry_run)
    except CrossSiteError as e:
        raise fail(e) from None


def _predict_dicomweb(model: Path | None, url: str, study: str, *, site: str | None, strategy: str | None,
                      dry_run: Path | None) -> None:
    from crosssite.pacs.dicomweb import dicomweb_client, score_study

    setup_logging()
    _require_pacs()
    sender = _sender(None, None if dry_run else url, dry_run, "CROSSSITE")
    pipeline = build_pipeline(model, sender, rules=None, spool=None, site=site, strategy=strategy, name="dicomweb")
    reports = score_study(pipeline, dicomweb_client(url), study)
    for report in reports:
        for volume, delivery in zip(report.volumes, report.delivery):
            part = f" ({volume.part})" if volume.part else ""
            ood = ", out of distribution" if volume.ood else ""
            typer.echo(f"series {report.series_uid}{part}: {len(volume.slices)} slices, P(COVID) "
                       f"{volume.p_covid:.4f}, {volume.label}{ood}; SR {delivery}")
    if not any(r.volumes for r in reports):
        raise CrossSiteError(f"study {study}: nothing to score (no series passed the selection rules)")
    if any(not d.startswith("sent") for r in reports for d in r.delivery):
        raise CrossSiteError(f"some reports were not delivered; they stay in {pipeline.outbox.folder}")
