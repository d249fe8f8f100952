"""Time from the last instance of a CT series arriving at crosssite's DICOM node to its SR stored in the PACS.

    python benchmarks/bench_pacs.py [--series 20] [--slices 60] [--size 512] [--complete-after 1.0]

A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started on loopback with a generated configuration)
routes every stable CT series to a node running in this process (`crosssite.pacs.node.DicomNode`, shipped model,
default rules), which sends its SR back by C-STORE. Each series (``--slices`` real slices of site B, resized to
``--size`` pixels, written as CT with pydicom; a new patient and study per series) is stored into Orthanc by REST
and the benchmark polls Orthanc every 20 ms until the SR is there. Reported per series: seconds from the node's
last received instance to the SR found in Orthanc, minus the series-complete wait (``--complete-after``, the
node's rule, not work); and, by the node's own clock, from that instance to its SR confirmed by Orthanc and the
association released (which can end after the SR is already visible in Orthanc). One warm-up series first, not
counted. Goal: p50 and max under 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from crosssite.inference import Predictor
from crosssite.models.adaptation import DEFAULT_STRATEGY
from crosssite.pacs.delivery import CStoreSender, Outbox
from crosssite.pacs.node import DicomNode
from crosssite.pacs.orthanc import OrthancProcess, free_port
from crosssite.pacs.pipeline import Pipeline
from crosssite.pacs.rules import SelectionRules
from crosssite.pacs.series import write_ct_series
from crosssite.pretrained import shipped_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--complete-after", type=float, default=1.0)
    args = parser.parse_args()
    load_start = os.getloadavg()

    files = sorted((DATA / "covid_ct" / "CT_COVID").glob("*.png"))[: args.slices]
    images = [np.asarray(Image.open(f).convert("L").resize((args.size, args.size)), np.float32) / 255 for f in files]
    images = [images[i % len(images)] for i in range(args.slices)]
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    node_port = free_port()
    last_arrival: dict[str, float] = {}
    lock = threading.Lock()

    with OrthancProcess(work / "orthanc", node=("CROSSSITE", "127.0.0.1", node_port), stable_age_s=1) as orthanc:
        predictor = Predictor.from_file(shipped_model(), adapt=DEFAULT_STRATEGY)
        sender = CStoreSender("127.0.0.1", orthanc.dicom_port, orthanc.aet)
        pipeline = Pipeline(predictor, SelectionRules(), work / "spool", Outbox(work / "outbox", sender))
        accept = pipeline.accept

        def timed_accept(ds: object, name: str = "instance") -> object:
            with lock:  # the instance has arrived: the clock starts before the node stores it
                last_arrival[str(ds.SeriesInstanceUID)] = time.monotonic()
            return accept(ds, name)

        pipeline.accept = timed_accept  # type: ignore[method-assign]
        node = DicomNode(pipeline, port=node_port, complete_after_s=args.complete_after).start()
        total, inside = [], []
        try:
            for k in range(args.series + 1):
                paths = write_ct_series(images, work / f"series{k}", patient_name=f"Bench^{k}",
                                        patient_id=f"BENCH-{k}")
                head = pydicom.dcmread(paths[0], stop_before_pixels=True)
                study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
                for p in paths:
                    orthanc.upload(p)
                deadline = time.monotonic() + 300
                while not orthanc.find("Instance", {"StudyInstanceUID": study, "Modality": "SR"}):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"no SR for series {k} after 300 s; see {orthanc.log}")
                    time.sleep(0.02)
                found = time.monotonic()
                report = node.completed.get(timeout=60)
                for p in paths:
                    p.unlink()
                if k == 0:
                    continue  # warm-up
                total.append(found - last_arrival[series] - args.complete_after)
                inside.append(report.seconds - args.complete_after)
                print(f"series {k:2d}: {total[-1]:.2f} s to the SR in Orthanc (node's clock: {inside[-1]:.2f} s), "
                      f"{len(report.volumes[0].slices)} slices scored", flush=True)
        finally:
            node.stop()
    load = os.getloadavg()
    print(f"\n{args.series} series of {args.slices} slices ({args.size} px): last instance -> SR stored in Orthanc, "
          f"excluding the {args.complete_after:g} s series-complete wait: p50 {statistics.median(total):.2f} s, "
          f"max {max(total):.2f} s (node's clock: p50 {statistics.median(inside):.2f} s, max {max(inside):.2f} s)")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average (1 / 5 / 15 min) at the start "
          f"{' / '.join(f'{v:.2f}' for v in load_start)}, at the end {' / '.join(f'{v:.2f}' for v in load)}")


if __name__ == "__main__":
    main()
